// nanovllm's chat page: talks to this server's /v1/chat/completions with stream: true.
// Model output is text, never markup: every string the model (or the user) wrote reaches the page
// through textContent, and code fences become <pre><code> elements (render.js), never innerHTML.
"use strict";

const KEY_STORAGE = "nanovllm.apiKey"; // sessionStorage: the key lives as long as the tab
const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"),
  log: $("log"),
  error: $("error"),
  input: $("input"),
  composer: $("composer"),
  send: $("send"),
  stop: $("stop"),
  newChat: $("new-chat"),
  settings: $("settings"),
  settingsToggle: $("settings-toggle"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  systemPrompt: $("system-prompt"),
  keyForm: $("key-form"),
  apiKey: $("api-key"),
};

// history holds the finished turns only: what the view shows is what the next request sends.
const state = { model: null, history: [], controller: null };

// ---- the view (text only: render.js) ---------------------------------------------------------

function addTurn(role, text) {
  const turn = node("div", `turn ${role}`);
  const body = node("div", "body");
  const meta = node("div", "meta");
  const name = (state.model || "model").split("/").pop(); // a path's last part is enough here
  turn.append(node("div", "who", role === "user" ? "You" : name), body, meta);
  renderText(body, text);
  ui.log.append(turn);
  scrollDown();
  return { turn, body, meta };
}

function scrollDown() {
  ui.log.scrollTop = ui.log.scrollHeight;
}

function showError(message) {
  ui.error.replaceChildren(node("span", "", message), node("button", "dismiss", "×"));
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.replaceChildren();
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
}

// ---- talking to the server -------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** A readable Error from a non-2xx response: status, OpenAI's error message, Retry-After. */
async function httpError(res) {
  let detail = "";
  try {
    const body = await res.json();
    detail = (body.error && body.error.message) || JSON.stringify(body);
  } catch {
    detail = res.statusText || "no details";
  }
  let message = `Error ${res.status}: ${detail}`;
  const retry = res.headers.get("Retry-After");
  if (res.status === 503 && retry) message += ` (retry in ${retry} s)`;
  if (res.status === 401) {
    sessionStorage.removeItem(KEY_STORAGE);
    askKey();
  }
  return new Error(message);
}

function readSettings() {
  const body = {};
  const t = ui.temperature.value.trim();
  if (t !== "") body.temperature = Number(t);
  const m = ui.maxTokens.value.trim();
  if (m !== "") body.max_tokens = Number(m); // the server names the field if it is not an integer
  const system = ui.systemPrompt.value.trim();
  return { body, system };
}

function formatStats(tokens, ttftMs, decodeSeconds, finish) {
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  if (ttftMs !== null) parts.push(`first token ${Math.round(ttftMs)} ms`);
  if (tokens > 1 && decodeSeconds > 0) parts.push(`${((tokens - 1) / decodeSeconds).toFixed(1)} tok/s`);
  if (finish === "length") parts.push("max tokens reached");
  return parts.join(" · ");
}

async function send() {
  const text = ui.input.value;
  if (!text.trim() || state.controller) return;
  clearError();
  ui.input.value = "";
  const { body: settings, system } = readSettings();
  const user = { role: "user", content: text };
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history, user];
  const userTurn = addTurn("user", text);
  const reply = addTurn("assistant", "");
  reply.turn.dataset.state = "streaming";
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);

  const request = { messages, stream: true, stream_options: { include_usage: true }, ...settings };
  if (state.model) request.model = state.model;
  const t0 = performance.now();
  let first = null;
  let answer = "";
  let usage = null;
  let finish = null;
  let done = false;
  try {
    let res;
    try {
      res = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(request),
        signal: controller.signal,
      });
    } catch (e) {
      if (controller.signal.aborted) throw e;
      throw new Error(`Cannot reach the server (${e.message}); is nanovllm serve still running?`);
    }
    if (!res.ok) throw await httpError(res);
    try {
      for await (const data of sseData(res.body)) {
        if (data === "[DONE]") {
          done = true;
          break;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(`The server failed the request: ${chunk.error.message}`);
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (first === null) first = performance.now();
          answer += piece;
          renderText(reply.body, answer);
          scrollDown();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    } catch (e) {
      if (controller.signal.aborted || e.message.startsWith("The server failed")) throw e;
      throw new Error(`The connection to the server was lost mid-reply (${e.message}).`);
    }
    if (!done) throw new Error("The connection to the server closed before the reply finished.");
    const end = performance.now();
    const tokens = usage ? usage.completion_tokens : 0;
    const decode = first === null ? 0 : (end - first) / 1000;
    reply.meta.textContent = formatStats(tokens, first === null ? null : first - t0, decode, finish);
    reply.meta.title = "tok/s counts the tokens after the first over the time after the first";
    reply.turn.dataset.state = "done";
    state.history.push(user, { role: "assistant", content: answer });
  } catch (e) {
    if (controller.signal.aborted) {
      // Stop (or New chat): the server saw the connection close and freed the request.
      reply.meta.textContent = "stopped";
      reply.turn.dataset.state = "stopped";
      if (state.controller === controller) state.history.push(user, { role: "assistant", content: answer });
    } else {
      // The failed exchange leaves the view and the history; its text goes back to the input.
      userTurn.turn.remove();
      reply.turn.remove();
      if (!ui.input.value) ui.input.value = text;
      showError(e.message);
    }
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      setBusy(false);
    }
  }
}

/** The model name from /v1/models; #model's data-state says how it went: ready, key, error. */
async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) throw await httpError(res);
    const card = (await res.json()).data[0];
    state.model = card.id;
    ui.model.textContent = card.id;
    ui.model.title = `context length ${card.max_model_len} tokens`;
    ui.model.dataset.state = "ready";
  } catch (e) {
    const needsKey = !ui.keyForm.hidden;
    ui.model.textContent = needsKey ? "API key needed" : "no model";
    ui.model.dataset.state = needsKey ? "key" : "error";
    showError(e.message.startsWith("Error") ? e.message : `Cannot reach the server (${e.message}).`);
  }
}

function askKey() {
  ui.keyForm.hidden = false;
  ui.apiKey.focus();
}

// ---- wiring ----------------------------------------------------------------------------------

ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
ui.newChat.addEventListener("click", () => {
  const controller = state.controller;
  state.controller = null;
  state.history = [];
  if (controller) controller.abort();
  setBusy(false);
  ui.log.replaceChildren();
  clearError();
  ui.input.focus();
});
ui.settingsToggle.addEventListener("click", () => {
  ui.settings.hidden = !ui.settings.hidden;
  ui.settingsToggle.setAttribute("aria-expanded", String(!ui.settings.hidden));
});
ui.error.addEventListener("click", (e) => {
  if (e.target.classList.contains("dismiss")) clearError();
});
ui.keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const key = ui.apiKey.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  ui.apiKey.value = "";
  ui.keyForm.hidden = true;
  clearError();
  loadModel();
});

loadModel();
