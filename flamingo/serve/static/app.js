// The page of `flamingo serve`: a chat with images and videos, and a few-shot builder. Both send the OpenAI chat
// API (streamed server-sent events) and show each answer's time to first token and tokens per second; with "token
// probabilities" on, each token of the answer is shaded by its probability and shows its alternatives on hover, and
// on the keyboard's focus: an answer's tokens are one Tab stop, the arrow keys move between them.
// The chat shows what the server was sent: a turn that fails goes back into the composer (text and attachments),
// and New chat aborts the turn on its way, of which nothing reaches the new chat. Stop (or Escape) ends an answer
// where it is: the server stops generating it, and the page keeps what came, marked as stopped.
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
    const response = await fetch("v1/models", { headers: headers() });
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

// The tabs, as ARIA's tab pattern has them: the selected one is aria-selected and the only one Tab reaches; the arrow
// keys, Home and End select another.
const tabs = Array.from(document.querySelectorAll(".tab"));
function selectTab(tab) {
  for (const t of tabs) {
    t.setAttribute("aria-selected", String(t === tab));
    t.tabIndex = t === tab ? 0 : -1;
  }
  for (const p of document.querySelectorAll(".panel")) p.classList.toggle("active", p.id === tab.dataset.panel);
}
for (const tab of tabs) {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (e) => {
    const i = tabs.indexOf(tab);
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1 + tabs.length, Home: 0, End: tabs.length - 1 }[e.key];
    if (next === undefined) return;
    e.preventDefault();
    const to = tabs[next % tabs.length];
    selectTab(to);
    to.focus();
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

// The files the server reads: images Pillow decodes (the server reads the bytes, whatever type they are sent as),
// videos PyAV decodes. By extension, for the file pickers' filter and for files the browser gives no type; a file the
// browser types as an image is taken unless it is one of NOT_READ: SVG (a drawing, not pixels), HEIC/HEIF and JPEG XL
// (Pillow needs plugins the server has not), JPEG 2000, TGA, PSD and ICO (readers the server leaves out); those are
// named in the notice, not attached.
const IMAGE_TYPES = {
  png: "image/png", apng: "image/apng", jpg: "image/jpeg", jpeg: "image/jpeg", jpe: "image/jpeg", jfif: "image/jpeg",
  gif: "image/gif", webp: "image/webp", bmp: "image/bmp", tif: "image/tiff", tiff: "image/tiff", avif: "image/avif",
  ppm: "image/x-portable-pixmap", pgm: "image/x-portable-graymap",
  pbm: "image/x-portable-bitmap",
};
const NOT_READ =
  /^image\/(svg|hei[cf]|jxl|jp2|jpx|jpm|x-tga|x-targa|vnd\.adobe\.photoshop|x-photoshop|x-icon|vnd\.microsoft\.icon)/;
const VIDEO_TYPES = {
  mp4: "video/mp4", m4v: "video/mp4", mov: "video/quicktime", webm: "video/webm", mkv: "video/x-matroska",
  avi: "video/x-msvideo",
};
const TYPES = { ...IMAGE_TYPES, ...VIDEO_TYPES };
// The file pickers' filter: those types, and their extensions for systems that give some files no type.
const ACCEPT = [...new Set(Object.values(IMAGE_TYPES)), "video/*", ...Object.keys(TYPES).map((ext) => "." + ext)]
  .join(",");

// A file's media type: the browser's when the server reads it (an image not NOT_READ, any video), else its name's
// extension's; "" for a file that is no image or video the server reads.
function mediaType(file) {
  if ((file.type.startsWith("image/") && !NOT_READ.test(file.type)) || file.type.startsWith("video/")) return file.type;
  const dot = file.name.lastIndexOf(".");
  return (dot >= 0 && TYPES[file.name.slice(dot + 1).toLowerCase()]) || "";
}

// The images and videos of a file list; the others are named in the notice, not dropped silently.
function mediaFiles(list) {
  const files = Array.from(list || []);
  const skipped = files.filter((f) => !mediaType(f)).map((f) => f.name || "(a file without a name)");
  const heic = skipped.some((name) => /\.hei[cf]$/i.test(name)) ? " (a HEIC photo: export it as JPEG)" : "";
  notify(skipped.length ? `Not attached: ${skipped.join(", ")}: not an image (PNG, JPEG, GIF, WebP, BMP, TIFF, ` +
                          `AVIF, ...) or a video the server reads${heic}` : "");
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
// A number setting as sent: the number typed (the server says what it refuses: 0 max tokens, a top p over 1,
// over its cap), or an error naming the field, which is marked until it is edited. A number field reads "" both when
// it is empty and when what is typed is no number ("e", "12e", "1e400"): validity.badInput tells them apart.
function numberSetting(selector, name, hint) {
  const field = $(selector);
  const problem = field.validity.badInput ? "is not a number" : field.value === "" ? "is empty" : "";
  if (!problem) return Number(field.value);
  field.setAttribute("aria-invalid", "true");
  throw new Error(`${name} ${problem}: enter ${hint}`);
}
for (const field of [$("#max-tokens"), $("#temperature"), $("#top-p")]) {
  field.addEventListener("input", () => field.removeAttribute("aria-invalid"));
}

// What an error response says: its JSON error's message, else (a proxy's page, a body cut short) the status's reason
// phrase (none over HTTP/2) or a sentence saying where such an answer may come from, then the body's words, trimmed.
async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const message = JSON.parse(text).error.message;
    if (message) return message;
  } catch (e) { /* not the server's JSON error */ }
  let words = text;
  if (/html/i.test(response.headers.get("content-type") || "") || /^\s*</.test(text)) {  // its text, not its tags
    const page = new DOMParser().parseFromString(text, "text/html");  // inert: nothing of it runs or loads
    for (const el of page.querySelectorAll("script, style")) el.remove();
    const walker = page.createTreeWalker(page.body, NodeFilter.SHOW_TEXT);
    for (words = ""; walker.nextNode();) words += " " + walker.currentNode.data;
  }
  words = words.replace(/\s+/g, " ").trim();
  if (words.length > 200) words = words.slice(0, 200) + "…";
  const what = response.statusText || (words ? "an error page, not the server's JSON error (from a proxy before it?)"
                                             : "an empty error answer (from a proxy before the server?)");
  return words ? `${what}: ${words}` : what;
}

// POST a chat request with stream=true; onText(text, entries) per piece of the answer's text (entries, when logprobs
// are asked for: those of the tokens that make it up, as a token whose text the server holds back, a byte of a
// character not yet complete or the leading space a chat answer drops, comes with the next piece's). Resolves to the
// answer's figures. tooLarge: what to do about a body over the server's limit (413); signal: an AbortSignal that
// stops the request (the server then stops generating it): the figures so far, `stopped` set unless the answer was
// complete (its finish_reason or [DONE] had come, and only the usage and the stream's close were on their way).
async function streamChat(messages, onText, tooLarge, signal) {
  const body = {
    model: modelName, messages, stream: true, stream_options: { include_usage: true },
    max_tokens: numberSetting("#max-tokens", "max tokens", "how many tokens the answer may have"),
    temperature: numberSetting("#temperature", "temperature", "0 (the likeliest token each time) to 2"),
  };
  const topP = numberSetting("#top-p", "top p", "0 (the likeliest token alone) to 1 (sample from every token)");
  if (topP !== Number($("#top-p").defaultValue)) body.top_p = topP;  // the default is the server's: not sent
  const probs = $("#show-probs").checked;
  if (probs) Object.assign(body, { logprobs: true, top_logprobs: 5 });
  const start = performance.now();
  let first = null, last = null, received = 0, tokens = null, reason = null, promptTokens = 0, cached = 0;
  let stopped = false, complete = false;
  try {
    const response = await fetch("v1/chat/completions",
                                 { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
    if (!response.ok) {
      let message = await errorMessage(response);
      // the limits a conversation outgrows as a whole (its media, the model's positions) refuse a later turn that
      // alone would fit: say so, as for a body too large
      const outgrown = response.status === 400 && messages.length > 1 &&
                       /(more than the .*(per prompt|reference tokens)|positions)$/.test(message);
      if (response.status === 413 || outgrown) message += ". " + tooLarge;
      if (response.status === 401) message += ". Enter the server's API key above.";
      throw new Error(`${response.status}: ${message}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", pending = [];  // pending: the logprobs entries of tokens whose text has not come yet
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (event === "data: [DONE]") complete = true;
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
            received += 1;
            if (choice.logprobs && choice.logprobs.content) pending.push(...choice.logprobs.content);
            if (delta.content) {
              onText(delta.content, probs ? pending : null);
              pending = [];
            }
          }
          if (choice.finish_reason) { reason = choice.finish_reason; complete = true; }
        }
      }
    }
  } catch (e) {
    if (!(signal && signal.aborted)) throw e;
    stopped = !complete;  // a stop after the answer's end is too late to stop it: the answer is whole
  }
  const end = performance.now();
  first = first === null ? end : first;
  tokens = tokens === null ? received : tokens;
  const decodeSeconds = ((last || end) - first) / 1000;
  return { ttftMs: first - start, tokens, reason, promptTokens, cached, stopped,
           tokensPerSecond: tokens > 1 && decodeSeconds > 0 ? (tokens - 1) / decodeSeconds : null };
}

// A token's text for a title; a byte of a character split over tokens reads "\ufffd": its bytes say which.
function tokenLabel(t) {
  if (!t.token.includes("\ufffd") || !t.bytes) return JSON.stringify(t.token);
  return `${JSON.stringify(t.token)} <${t.bytes.map((b) => b.toString(16).padStart(2, "0")).join(" ")}>`;
}

// Append a piece of an answer to `out`: plain text, or (with the logprobs entries of its tokens) a span shaded by
// their joint probability, whose title lists the likeliest alternatives of its token, or each of its tokens. The
// answer's first span is its Tab stop (`tokenKeys` moves it).
function appendPiece(out, text, entries) {
  if (!entries || !entries.length) { out.append(text); return; }
  const logprob = entries.reduce((sum, entry) => sum + entry.logprob, 0);
  const p = Math.exp(logprob);
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  span.dataset.logprob = logprob;
  span.dataset.tokens = entries.length;
  span.style.background = `rgba(217, 72, 15, ${(0.6 * (1 - p)).toFixed(3)})`;
  span.tabIndex = $(".tok", out) ? -1 : 0;
  const percent = (lp) => `${(100 * Math.exp(lp)).toFixed(1)}%`;
  const alternatives = (entry) => entry.top_logprobs.map((t) => `${tokenLabel(t)} ${percent(t.logprob)}`);
  if (entries.length === 1) {
    span.title = `${tokenLabel(entries[0])} ${percent(logprob)}\n` + alternatives(entries[0]).join("\n");
  } else {
    span.title = `${JSON.stringify(text)} ${percent(logprob)}: ${entries.length} tokens together\n` + entries.map(
      (entry) => `${tokenLabel(entry)} ${percent(entry.logprob)}; likeliest: ${alternatives(entry).join(", ")}`)
      .join("\n");
  }
  out.append(span);
}

// A token's alternatives for the keyboard (its title shows on hover only): the focused token's title shows in a
// tooltip under it, which is its description while it has the focus; Escape hides it.
const tokenTip = $("#token-tip");
function showTip(span) {
  tokenTip.textContent = span.title;
  tokenTip.hidden = false;
  const box = span.getBoundingClientRect();
  const left = Math.max(0, Math.min(box.left, document.documentElement.clientWidth - tokenTip.offsetWidth));
  tokenTip.style.left = `${scrollX + left}px`;
  tokenTip.style.top = `${scrollY + box.bottom + 4}px`;
  span.setAttribute("aria-describedby", tokenTip.id);
}
function hideTip(span) {
  tokenTip.hidden = true;
  span.removeAttribute("aria-describedby");
}
const isToken = (el) => el instanceof Element && el.classList.contains("tok");
document.addEventListener("focusin", (e) => { if (isToken(e.target)) showTip(e.target); });
document.addEventListener("focusout", (e) => { if (isToken(e.target)) hideTip(e.target); });
// In an answer, the arrow keys move the focus to the next or previous token (in the answer's direction: right is
// back in Hebrew), Home and End to its first and last; the token reached is the answer's Tab stop from then on.
function tokenKeys(e) {
  const span = e.target;
  if (e.key === "Escape" && !tokenTip.hidden) { e.preventDefault(); hideTip(span); return; }
  const tokens = Array.from(span.parentElement.querySelectorAll(".tok"));
  const i = tokens.indexOf(span);
  const right = getComputedStyle(span.parentElement).direction === "rtl" ? -1 : 1;  // the next token's side
  const to = { ArrowRight: i + right, ArrowLeft: i - right, ArrowDown: i + 1, ArrowUp: i - 1, Home: 0,
               End: tokens.length - 1 }[e.key];
  if (to === undefined || e.altKey || e.ctrlKey || e.metaKey) return;
  e.preventDefault();
  const next = tokens[Math.max(0, Math.min(to, tokens.length - 1))];
  span.tabIndex = -1;
  next.tabIndex = 0;
  next.focus();
}
document.addEventListener("keydown", (e) => { if (isToken(e.target)) tokenKeys(e); });

function describe(stats) {
  const speed = stats.tokensPerSecond === null ? "–" : stats.tokensPerSecond.toFixed(1);
  const cached = stats.cached ? ` · ${stats.cached} of ${stats.promptTokens} prompt tokens cached` : "";
  const figures = `time to first token ${stats.ttftMs.toFixed(0)} ms · ${speed} tokens/s · ${stats.tokens} tokens`;
  return stats.stopped ? `stopped by you · ${figures}` : `${figures}${cached} · ${stats.reason || ""}`;
}

// The Stop button in place of `start` (Send, Run) while `running`.
function showStop(start, stop, running) {
  // the button that hides may hold the keyboard's focus: it moves to the one shown, not to the page's top
  const focused = document.activeElement === (running ? start : stop);
  start.hidden = running;
  start.disabled = running;
  stop.hidden = !running;
  if (focused) (running ? stop : start).focus();
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
    remove.addEventListener("click", () => {
      attachments.splice(i, 1);
      renderAttachments();
      // the focus, on the button now gone, moves to the next one left (else the last), else to the message box
      const left = box.querySelectorAll("button");
      (left.length ? left[Math.min(i, left.length - 1)] : $("#chat-input")).focus();
    });
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
  body.dir = "auto";  // each message in its own text's direction (Hebrew, Arabic)
  body.textContent = text;
  el.append(body);
  const stats = document.createElement("div");
  stats.className = "stats";
  el.append(stats);
  $("#messages").append(el);
  return el;
}

// The chat follows its end, as chat pages do: while the reader is at the end, whatever lengthens the conversation (a
// message, a piece of an answer, an image loading) keeps its newest line, the composer and Stop in view. A reader who
// scrolls up to read stays where they are until they scroll back to the end or send the next turn. From the first
// turn on: a page opened on a short screen stays at its top.
let following = false;
let lastScrollY = scrollY;
function follow() {
  if (following && $("#chat").classList.contains("active")) scrollTo(0, document.documentElement.scrollHeight);
}
addEventListener("scroll", () => {
  if (scrollY < lastScrollY) following = false;  // up: the reader's (a scroll to the end only goes down)
  else if (innerHeight + scrollY >= document.documentElement.scrollHeight - 4) following = true;
  lastScrollY = scrollY;
}, { passive: true });
new ResizeObserver(follow).observe($("#messages"));

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
  $("#messages").setAttribute("aria-busy", "true");  // a screen reader says the answer once it is whole
  following = true;
  follow();
  const out = $(".text", reply);
  const mine = chat;
  turn = new AbortController();
  showStop($("#chat-send"), $("#chat-stop"), true);
  let stats = null, error = null;
  try {
    stats = await streamChat(history, (t, entries) => appendPiece(out, t, entries), TOO_LARGE_CHAT, turn.signal);
  } catch (e) {
    error = e;
  }
  if (mine !== chat) return;  // New chat since: this turn was aborted, and its conversation is gone
  // Stopped: the answer so far stays in the conversation, marked; stopped before any text, the turn goes back.
  if (!error && stats.stopped && !out.textContent) error = new Error("Stopped before the answer began");
  if (error) {
    history.pop();
    restoreTurn(sent, media, text, reply, error);
  } else {
    history.push({ role: "assistant", content: out.textContent });
    reply.classList.toggle("stopped", stats.stopped);
    $(".stats", reply).textContent = describe(stats);
  }
  reply.dataset.done = "true";
  $("#messages").removeAttribute("aria-busy");
  turn = null;
  showStop($("#chat-send"), $("#chat-stop"), false);
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
  $("#messages").removeAttribute("aria-busy");
  showStop($("#chat-send"), $("#chat-stop"), false);
});
// Stop: the answer stops where it is (the server stops generating it) and stays, marked as stopped.
$("#chat-stop").addEventListener("click", () => { if (turn) turn.abort(); });

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

// Each demo's fields and remove button named by its number (as errors count them): a screen reader's list of them
// tells the demos apart.
function numberDemos() {
  document.querySelectorAll("#demos .demo").forEach((demo, i) => {
    const n = i + 1;
    $(".remove", demo).title = `remove demo ${n}`;
    $(".remove", demo).setAttribute("aria-label", `remove demo ${n}`);
    $(".demo-file", demo).setAttribute("aria-label", `demo ${n} image / video`);
    $(".prompt", demo).setAttribute("aria-label", `demo ${n} prompt`);
    $(".answer", demo).setAttribute("aria-label", `demo ${n} answer`);
  });
}

function addDemo() {
  const el = $("#demo-template").content.firstElementChild.cloneNode(true);
  mediaSlot(el, $(".demo-file", el));
  $(".remove", el).addEventListener("click", () => {
    // the focus, on the button going, moves to the next demo's (else to + Add demo), not to the page's top
    const next = el.nextElementSibling;
    el.remove();
    numberDemos();
    (next ? $(".remove", next) : $("#add-demo")).focus();
  });
  $("#demos").append(el);
  numberDemos();
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

let fewShotRun = null;  // the AbortController of the run on its way, if any

async function runFewShot() {
  if (fewShotRun) return;  // Enter while a run is on its way
  const out = $("#fewshot-output");
  out.dataset.done = "false";
  out.setAttribute("aria-busy", "true");
  out.classList.remove("error", "stopped");
  out.textContent = "";
  $("#fewshot-stats").textContent = "";
  fewShotRun = new AbortController();
  showStop($("#run-fewshot"), $("#stop-fewshot"), true);
  try {
    const stats = await streamChat(fewShotMessages(), (t, entries) => appendPiece(out, t, entries),
                                   "Use fewer demos, or fewer or smaller images and videos", fewShotRun.signal);
    out.classList.toggle("stopped", stats.stopped);
    $("#fewshot-stats").textContent = stats.stopped && !out.textContent ? "stopped before the answer began"
                                                                        : describe(stats);
  } catch (e) {
    out.classList.add("error");
    out.textContent = e.message;
  } finally {
    out.dataset.done = "true";
    out.removeAttribute("aria-busy");
    fewShotRun = null;
    showStop($("#run-fewshot"), $("#stop-fewshot"), false);
  }
}

mediaSlot($("#query"), $("#query-file"));
$("#add-demo").addEventListener("click", addDemo);
$("#run-fewshot").addEventListener("click", runFewShot);
$("#query-text").addEventListener("keydown", (e) => {  // Enter runs, as it sends in the chat
  if (e.key === "Enter" && !e.isComposing && e.keyCode !== 229) { e.preventDefault(); runFewShot(); }
});
$("#stop-fewshot").addEventListener("click", () => { if (fewShotRun) fewShotRun.abort(); });

// Escape stops the answer streaming in the tab on screen (not an input method's composition being cancelled).
document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape" || e.isComposing || e.defaultPrevented) return;  // (a token's tooltip hidden)
  const running = $("#chat").classList.contains("active") ? turn : fewShotRun;
  if (running) { e.preventDefault(); running.abort(); }
});
addDemo();
