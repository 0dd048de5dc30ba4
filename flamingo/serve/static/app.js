// The page of `flamingo serve`: a chat with images and videos, and a few-shot builder. Both send the OpenAI chat
// API (streamed server-sent events) and show each answer's time to first token and tokens per second; with "token
// probabilities" on, each token of the answer is shaded by its probability and shows its alternatives on hover.
// The chat shows what the server was sent: a turn that fails goes back into the composer (text and attachments),
// and New chat aborts the turn on its way, of which nothing reaches the new chat.
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

// A line under the settings: what the page did not do and why (skipped files).
function notify(text) { $("#notice").textContent = text; }

let modelName = "flamingo";
async function loadModelName() {
  const shown = $("#model-name");
  shown.classList.remove("error");
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      shown.classList.add("error");
      shown.textContent = apiKey.value ? "(wrong API key: enter the server's key above)"
                                       : "(this server needs an API key: enter it above)";
      return;
    }
    const body = await response.json();
    if (!response.ok || !body.data || !body.data.length) throw new Error(String(response.status));
    modelName = body.data[0].id;
    shown.textContent = modelName;
  } catch (e) {
    shown.textContent = "(model list unavailable)";
  }
}
loadModelName();
apiKey.addEventListener("change", loadModelName);

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

// The files the server reads, by extension: images Pillow decodes, videos PyAV decodes. SVG (a drawing, not pixels)
// and HEIC/HEIF (Pillow needs a plugin the server has not) are named in the notice, not attached.
const IMAGE_TYPES = {
  png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif", webp: "image/webp", bmp: "image/bmp",
  tif: "image/tiff", tiff: "image/tiff", avif: "image/avif",
};
const VIDEO_TYPES = {
  mp4: "video/mp4", m4v: "video/mp4", mov: "video/quicktime", webm: "video/webm", mkv: "video/x-matroska",
  avi: "video/x-msvideo",
};
const TYPES = { ...IMAGE_TYPES, ...VIDEO_TYPES };
const READ_IMAGES = new Set(Object.values(IMAGE_TYPES));
// The file pickers' filter: those types, and their extensions for systems that give some files no type.
const ACCEPT = [...READ_IMAGES, "video/*", ...Object.keys(TYPES).map((ext) => "." + ext)].join(",");

// A file's media type: the browser's when the server reads it (any video), else its name's extension's; "" for
// a file that is no image or video the server reads.
function mediaType(file) {
  if (READ_IMAGES.has(file.type) || file.type.startsWith("video/")) return file.type;
  const dot = file.name.lastIndexOf(".");
  return (dot >= 0 && TYPES[file.name.slice(dot + 1).toLowerCase()]) || "";
}

// The images and videos of a file list; the others are named in the notice, not dropped silently.
function mediaFiles(list) {
  const files = Array.from(list || []);
  const skipped = files.filter((f) => !mediaType(f)).map((f) => f.name || "(a file without a name)");
  const heic = skipped.some((name) => /\.hei[cf]$/i.test(name)) ? " (a HEIC photo: export it as JPEG)" : "";
  notify(skipped.length ? `Not attached: ${skipped.join(", ")}: not an image (PNG, JPEG, GIF, WebP, BMP, TIFF, ` +
                          `AVIF) or a video the server reads${heic}` : "");
  return files.filter((f) => mediaType(f));
}

async function toMedium(file) {
  const type = mediaType(file);
  let url = await readAsDataURL(file);
  if (type !== file.type) url = url.replace(/^data:[^;,]*/, "data:" + type);  // typeless: application/octet-stream
  return { url, video: type.startsWith("video/"), name: file.name };
}

function preview(medium) {
  const el = document.createElement(medium.video ? "video" : "img");
  el.src = medium.url;
  el.title = medium.name || "";
  if (!medium.video) el.alt = medium.name || "image";
  if (medium.video) el.muted = true;
  return el;
}

function part(medium) {
  return medium.video ? { type: "video_url", video_url: { url: medium.url } }
                      : { type: "image_url", image_url: { url: medium.url } };
}

// Whether a drag carries files (not text, which drops into a text field as the browser does it).
const carriesFiles = (e) => Array.from(e.dataTransfer.types).includes("Files");

// Drag and drop and paste onto an element: `take(files)` receives the media files.
function acceptMedia(el, take) {
  el.addEventListener("dragover", (e) => { if (carriesFiles(e)) { e.preventDefault(); el.classList.add("over"); } });
  el.addEventListener("dragleave", () => el.classList.remove("over"));
  el.addEventListener("drop", (e) => {
    el.classList.remove("over");
    if (!carriesFiles(e)) return;
    e.preventDefault();
    take(mediaFiles(e.dataTransfer.files));
  });
  el.addEventListener("paste", (e) => {
    const pasted = Array.from(e.clipboardData.items).map((i) => i.getAsFile()).filter(Boolean);
    if (!pasted.length) return;  // text: pasted as the browser does it
    const files = mediaFiles(pasted);
    if (files.length) { e.preventDefault(); take(files); }
  });
}

// A file dropped beside the drop zones is not opened by the browser: that would leave the page, and its chat.
for (const type of ["dragover", "drop"]) {
  document.addEventListener(type, (e) => { if (carriesFiles(e)) e.preventDefault(); });
}

// ------------------------------------------------------------------------------------------------ streaming
// The max tokens field as sent: the number typed (the server says what it refuses: 0, over its cap), or an error.
function maxTokens() {
  const typed = $("#max-tokens").value.trim();
  if (typed === "") throw new Error("max tokens is empty: enter how many tokens the answer may have");
  return Number(typed);
}

// POST a chat request with stream=true; onText(delta, entry) per token (entry: its logprobs entry, when asked for);
// resolves to the answer's figures. tooLarge: what to do about a body over the server's limit (413); signal: an
// AbortSignal that cancels the request (the server then stops generating it).
async function streamChat(messages, onText, tooLarge, signal) {
  const body = {
    model: modelName, messages, stream: true, stream_options: { include_usage: true },
    max_tokens: maxTokens(), temperature: parseFloat($("#temperature").value) || 0,
  };
  if ($("#show-probs").checked) Object.assign(body, { logprobs: true, top_logprobs: 5 });
  const start = performance.now();
  const response = await fetch("/v1/chat/completions",
                               { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    if (response.status === 413) message += ". " + tooLarge;
    if (response.status === 401) message += ". Enter the server's API key above.";
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
let chat = 0;  // which conversation is on screen: New chat starts another, and a turn updates only its own
let turn = null;  // the AbortController of the turn on its way, if any

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
    remove.title = `remove ${medium.video ? "video" : "image"} ${i + 1}` + (medium.name ? ` (${medium.name})` : "");
    remove.setAttribute("aria-label", remove.title);
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

const TOO_LARGE_CHAT = "Every turn sends the whole conversation again, its images and videos too: start a New " +
                       "chat, or attach fewer or smaller ones";

// A failed turn leaves the conversation: its bubble goes, its text and media go back into the composer (before
// anything typed since), and the error shows in a note that is no turn.
function restoreTurn(sent, media, text, reply, error) {
  sent.remove();
  attachments = [...media, ...attachments];
  renderAttachments();
  const input = $("#chat-input");
  input.value = input.value ? text + "\n" + input.value : text;
  reply.className = "msg note";
  $(".text", reply).classList.add("error");
  $(".text", reply).textContent = error.message;
  $(".stats", reply).textContent = "not in the conversation: your message is back in the box below";
}

async function sendChat() {
  const text = $("#chat-input").value;
  if (turn || (!text && !attachments.length)) return;  // Enter while a turn is on its way
  const media = attachments;
  const content = [...media.map(part), ...(text ? [{ type: "text", text }] : [])];
  for (const note of document.querySelectorAll("#messages .msg.note")) note.remove();  // an earlier failure's
  const sent = addMessage("user", media, text);
  history.push({ role: "user", content });
  attachments = [];
  renderAttachments();
  $("#chat-input").value = "";
  const reply = addMessage("assistant", [], "");
  reply.dataset.done = "false";
  const out = $(".text", reply);
  const mine = chat;
  turn = new AbortController();
  $("#chat-send").disabled = true;
  let stats = null, error = null;
  try {
    stats = await streamChat(history, (t, entry) => appendPiece(out, t, entry), TOO_LARGE_CHAT, turn.signal);
  } catch (e) {
    error = e;
  }
  if (mine !== chat) return;  // New chat since: this turn was aborted, and its conversation is gone
  if (error) {
    history.pop();
    restoreTurn(sent, media, text, reply, error);
  } else {
    history.push({ role: "assistant", content: out.textContent });
    $(".stats", reply).textContent = describe(stats);
  }
  reply.dataset.done = "true";
  turn = null;
  $("#chat-send").disabled = false;
}

$("#chat-file").accept = ACCEPT;
$("#chat-file").addEventListener("change", (e) => { attach(mediaFiles(e.target.files)); e.target.value = ""; });
acceptMedia($("#composer"), attach);
$("#chat-send").addEventListener("click", sendChat);
$("#chat-input").addEventListener("keydown", (e) => {
  // Enter sends; Shift+Enter is a newline, and an Enter that confirms an input method's composition (Japanese,
  // Chinese, Korean: isComposing, or keyCode 229 where the browser reports it so) belongs to the composition.
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) { e.preventDefault(); sendChat(); }
});
// New chat: the turn on its way is aborted (the server stops generating an answer nobody will see).
$("#chat-clear").addEventListener("click", () => {
  chat += 1;
  if (turn) turn.abort();
  turn = null;
  history.length = 0;
  $("#messages").replaceChildren();
  $("#chat-send").disabled = false;
});

// ------------------------------------------------------------------------------------------------ few-shot
// Each demo and the query hold one medium in `el.medium`, set by their file input or a drop / paste.
function mediaSlot(el, input) {
  const set = async (files) => {
    if (!files.length) return;
    el.medium = await toMedium(files[0]);
    $(".media-slot", el).replaceChildren(preview(el.medium));
  };
  input.accept = ACCEPT;
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

// The demos as (user, assistant) turns, then the query. A demo with neither a medium nor an answer (the one the page
// starts with, untouched) is left out; one with a medium and no answer is refused: it would teach an empty answer.
function fewShotMessages() {
  const messages = [];
  for (const [i, demo] of Array.from(document.querySelectorAll("#demos .demo")).entries()) {
    const answer = $(".answer", demo).value;
    if (!demo.medium && !answer) continue;
    if (!answer) throw new Error(`demo ${i + 1} has no answer: type its answer, or remove the demo`);
    const content = [...(demo.medium ? [part(demo.medium)] : []), { type: "text", text: $(".prompt", demo).value }];
    messages.push({ role: "user", content }, { role: "assistant", content: answer });
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
    const stats = await streamChat(fewShotMessages(), (t, entry) => appendPiece(out, t, entry),
                                   "Use fewer demos, or fewer or smaller images and videos");
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
