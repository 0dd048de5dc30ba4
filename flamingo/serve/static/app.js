// The page of `flamingo serve`: a chat with images and videos, and a few-shot builder. Both send the OpenAI chat
// API (streamed server-sent events) and show each answer's time to first token and tokens per second; with "token
// probabilities" on, each token of the answer is shaded by its probability and shows its alternatives on hover.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);

// ------------------------------------------------------------------------------------------------ settings
const apiKey = $("#api-key");
apiKey.value = localStorage.getItem("flamingo-api-key") || "";
apiKey.addEventListener("change", () => localStorage.setItem("flamingo-api-key", apiKey.value));

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey.value) h.Authorization = "Bearer " + apiKey.value;
  return h;
}

let modelName = "flamingo";
fetch("/v1/models", { headers: headers() }).then((r) => r.json()).then((body) => {
  if (body.data && body.data.length) modelName = body.data[0].id;
  $("#model-name").textContent = modelName;
}).catch(() => { $("#model-name").textContent = "(model list unavailable)"; });

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
    for (const p of document.querySelectorAll(".panel")) p.classList.toggle("active", p.id === tab.dataset.panel);
  });
}

// ------------------------------------------------------------------------------------------------ media
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function mediaFiles(list) {
  return Array.from(list || []).filter((f) => f.type.startsWith("image/") || f.type.startsWith("video/"));
}

async function toMedium(file) {
  return { url: await readAsDataURL(file), video: file.type.startsWith("video/"), name: file.name };
}

function preview(medium) {
  const el = document.createElement(medium.video ? "video" : "img");
  el.src = medium.url;
  el.title = medium.name || "";
  if (medium.video) el.muted = true;
  return el;
}

function part(medium) {
  return medium.video ? { type: "video_url", video_url: { url: medium.url } }
                      : { type: "image_url", image_url: { url: medium.url } };
}

// Drag and drop and paste onto an element: `take(files)` receives the media files.
function acceptMedia(el, take) {
  el.addEventListener("dragover", (e) => { e.preventDefault(); el.classList.add("over"); });
  el.addEventListener("dragleave", () => el.classList.remove("over"));
  el.addEventListener("drop", (e) => {
    e.preventDefault();
    el.classList.remove("over");
    take(mediaFiles(e.dataTransfer.files));
  });
  el.addEventListener("paste", (e) => {
    const files = mediaFiles(Array.from(e.clipboardData.items).map((i) => i.getAsFile()).filter(Boolean));
    if (files.length) { e.preventDefault(); take(files); }
  });
}

// ------------------------------------------------------------------------------------------------ streaming
// POST a chat request with stream=true; onText(delta, entry) per token (entry: its logprobs entry, when asked for);
// resolves to the answer's figures.
async function streamChat(messages, onText) {
  const body = {
    model: modelName, messages, stream: true, stream_options: { include_usage: true },
    max_tokens: parseInt($("#max-tokens").value, 10) || 32,
    temperature: parseFloat($("#temperature").value) || 0,
  };
  if ($("#show-probs").checked) Object.assign(body, { logprobs: true, top_logprobs: 5 });
  const start = performance.now();
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${message}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", first = null, last = null, tokens = 0, reason = null, promptTokens = 0, cached = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const chunk = JSON.parse(event.slice(6));
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {
        tokens = chunk.usage.completion_tokens;
        promptTokens = chunk.usage.prompt_tokens;
        cached = (chunk.usage.prompt_tokens_details || {}).cached_tokens || 0;  // the server's prefix cache
      }
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (typeof delta.content === "string" && !delta.role) {  // one chunk per token (maybe empty text)
          const now = performance.now();
          if (first === null) first = now;
          last = now;
          if (delta.content) onText(delta.content, choice.logprobs ? choice.logprobs.content[0] : null);
        }
        if (choice.finish_reason) reason = choice.finish_reason;
      }
    }
  }
  const end = performance.now();
  first = first === null ? end : first;
  const decodeSeconds = ((last || end) - first) / 1000;
  return { ttftMs: first - start, tokens, reason, promptTokens, cached,
           tokensPerSecond: tokens > 1 && decodeSeconds > 0 ? (tokens - 1) / decodeSeconds : null };
}

// Append a piece of an answer to `out`: plain text, or (with a logprobs entry) a span shaded by the token's
// probability whose title lists the likeliest alternatives.
function appendPiece(out, text, entry) {
  if (!entry) { out.append(text); return; }
  const p = Math.exp(entry.logprob);
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  span.dataset.logprob = entry.logprob;
  span.style.background = `rgba(217, 72, 15, ${(0.6 * (1 - p)).toFixed(3)})`;
  const percent = (logprob) => `${(100 * Math.exp(logprob)).toFixed(1)}%`;
  const alternatives = entry.top_logprobs.map((t) => `${JSON.stringify(t.token)} ${percent(t.logprob)}`);
  span.title = `${JSON.stringify(entry.token)} ${percent(entry.logprob)}\n` + alternatives.join("\n");
  out.append(span);
}

function describe(stats) {
  const speed = stats.tokensPerSecond === null ? "–" : stats.tokensPerSecond.toFixed(1);
  const cached = stats.cached ? ` · ${stats.cached} of ${stats.promptTokens} prompt tokens cached` : "";
  return `time to first token ${stats.ttftMs.toFixed(0)} ms · ${speed} tokens/s · ${stats.tokens} tokens` +
         `${cached} · ${stats.reason || ""}`;
}

// ------------------------------------------------------------------------------------------------ chat
const history = [];  // OpenAI messages sent so far
let attachments = [];

function renderAttachments() {
  const box = $("#chat-attachments");
  box.replaceChildren();
  attachments.forEach((medium, i) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.append(preview(medium));
    const remove = document.createElement("button");
    remove.textContent = "×";
    remove.className = "secondary";
    remove.addEventListener("click", () => { attachments.splice(i, 1); renderAttachments(); });
    chip.append(remove);
    box.append(chip);
  });
}

async function attach(files) {
  for (const file of files) attachments.push(await toMedium(file));
  renderAttachments();
}

function addMessage(role, media, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  for (const medium of media) el.append(preview(medium));
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  el.append(body);
  const stats = document.createElement("div");
  stats.className = "stats";
  el.append(stats);
  $("#messages").append(el);
  return el;
}

async function sendChat() {
  const text = $("#chat-input").value;
  if (!text && !attachments.length) return;
  const content = [...attachments.map(part), ...(text ? [{ type: "text", text }] : [])];
  addMessage("user", attachments, text);
  history.push({ role: "user", content });
  attachments = [];
  renderAttachments();
  $("#chat-input").value = "";
  const reply = addMessage("assistant", [], "");
  reply.dataset.done = "false";
  const out = $(".text", reply);
  $("#chat-send").disabled = true;
  try {
    const stats = await streamChat(history, (t, entry) => appendPiece(out, t, entry));
    history.push({ role: "assistant", content: out.textContent });
    $(".stats", reply).textContent = describe(stats);
  } catch (e) {
    history.pop();
    out.classList.add("error");
    out.textContent = e.message;
  } finally {
    reply.dataset.done = "true";
    $("#chat-send").disabled = false;
  }
}

$("#chat-file").addEventListener("change", (e) => { attach(mediaFiles(e.target.files)); e.target.value = ""; });
acceptMedia($("#composer"), attach);
$("#chat-send").addEventListener("click", sendChat);
$("#chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendChat(); }
});
$("#chat-clear").addEventListener("click", () => { history.length = 0; $("#messages").replaceChildren(); });

// ------------------------------------------------------------------------------------------------ few-shot
// Each demo and the query hold one medium in `el.medium`, set by their file input or a drop / paste.
function mediaSlot(el, input) {
  const set = async (files) => {
    if (!files.length) return;
    el.medium = await toMedium(files[0]);
    $(".media-slot", el).replaceChildren(preview(el.medium));
  };
  input.addEventListener("change", () => set(mediaFiles(input.files)));
  acceptMedia(el, set);
}

function addDemo() {
  const el = $("#demo-template").content.firstElementChild.cloneNode(true);
  mediaSlot(el, $(".demo-file", el));
  $(".remove", el).addEventListener("click", () => el.remove());
  $("#demos").append(el);
  return el;
}

function fewShotMessages() {
  const messages = [];
  for (const demo of document.querySelectorAll("#demos .demo")) {
    const content = [...(demo.medium ? [part(demo.medium)] : []), { type: "text", text: $(".prompt", demo).value }];
    messages.push({ role: "user", content }, { role: "assistant", content: $(".answer", demo).value });
  }
  const query = $("#query");
  messages.push({ role: "user", content: [...(query.medium ? [part(query.medium)] : []),
                                          { type: "text", text: $("#query-text").value }] });
  return messages;
}

async function runFewShot() {
  const out = $("#fewshot-output");
  out.dataset.done = "false";
  out.classList.remove("error");
  out.textContent = "";
  $("#fewshot-stats").textContent = "";
  $("#run-fewshot").disabled = true;
  try {
    const stats = await streamChat(fewShotMessages(), (t, entry) => appendPiece(out, t, entry));
    $("#fewshot-stats").textContent = describe(stats);
  } catch (e) {
    out.classList.add("error");
    out.textContent = e.message;
  } finally {
    out.dataset.done = "true";
    $("#run-fewshot").disabled = false;
  }
}

mediaSlot($("#query"), $("#query-file"));
$("#add-demo").addEventListener("click", addDemo);
$("#run-fewshot").addEventListener("click", runFewShot);
addDemo();
