// The playground: settings, one chat pane (or two side by side in compare mode), streamed
// replies with a Stop button, and an "inside the model" view per pane. State lives in plain
// objects; the DOM is built with createElement and textContent, never from model text as HTML.

import { Api } from "./api.js";
import { formatMs, Inspector } from "./inspector.js";
import { TokenPopover } from "./tokens.js";

const KEY_STORAGE = "lmforge.playground.apiKey";
const SETTINGS_STORAGE = "lmforge.playground.settings";
const LETTERS = ["a", "b"];
const TOP_LOGPROBS = 5;

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const api = new Api(() => $("api-key").value);
const popover = new TokenPopover($("token-popover"));

const state = {
  models: [], // the models that generate (embedding models answer /v1/embeddings only)
  indexes: [], // what a turn may retrieve from (GET /rag/indexes)
  compare: false,
  controller: null, // AbortController of the turn in flight: Stop aborts it
  panes: [],
};

// ---- one chat column ---------------------------------------------------------------------

class Pane {
  constructor(index) {
    this.index = index;
    this.letter = LETTERS[index];
    this.messages = [];
    this.modelSelect = $(`model-${this.letter}`);
    this.inspector = new Inspector(index, popover);
    $("inspectors").append(this.inspector.root);

    this.root = element("section", `pane pane-${this.letter}`);
    this.root.dataset.pane = this.letter;
    const head = element("header", "pane-head");
    this.modelLabel = element("span", "pane-model", "");
    head.append(element("span", `pane-dot ${this.letter}`), this.modelLabel);
    this.list = element("div", "messages");
    this.list.setAttribute("aria-live", "polite");
    this.root.append(head, this.list);
    $("panes").append(this.root);
    this.renderEmpty();
  }

  get model() {
    return this.modelSelect.value;
  }

  modelChanged() {
    this.modelLabel.textContent = this.model || "no model";
    this.inspector.setModel(this.model);
  }

  renderEmpty() {
    const hint = element("div", "empty-state");
    hint.append(element("p", "empty-title", "Ask the model something."),
      element("p", "", "Its reply streams in token by token. On the right you can see the prompt as the "
        + "model reads it, and how sure it was of every token it wrote."));
    this.list.replaceChildren(hint);
  }

  reset() {
    this.messages = [];
    this.renderEmpty();
    this.inspector.clear(this.model);
  }

  /** The conversation as the API wants it: system prompt, then every turn that did not fail. */
  conversation() {
    const messages = [];
    const system = $("system-prompt").value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const m of this.messages) {
      if (!m.failed) messages.push({ role: m.role, content: m.content });
    }
    return messages;
  }

  add(message) {
    if (!this.messages.length) this.list.replaceChildren();
    this.messages.push(message);
    message.view = new MessageView(message, () => this.inspect(message));
    this.list.append(message.view.root);
    this.scrollToEnd(true);
    return message;
  }

  inspect(message) {
    const assistants = this.messages.filter((m) => m.role === "assistant");
    for (const m of assistants) m.view.root.classList.toggle("inspected", m === message);
    this.inspector.show(message, { latest: message === assistants.at(-1) });
  }

  scrollToEnd(force = false) {
    const list = this.list;
    const nearEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    if (force || nearEnd) list.scrollTop = list.scrollHeight;
  }

  /** Copy another pane's conversation (entering compare mode mid-conversation). */
  copyFrom(other) {
    for (const m of other.messages) {
      if (m.failed) continue;
      const copy = { ...m, view: null, tokens: [...(m.tokens || [])], stats: { ...(m.stats || {}) } };
      this.add(copy);
      copy.view.finish();
    }
  }
}

// ---- one message in a chat column -------------------------------------------------------------

class MessageView {
  constructor(message, onInspect) {
    const mine = message.role === "user";
    this.root = element("article", `msg ${message.role}`);
    const head = element("div", "msg-head");
    head.append(element("span", "msg-role", mine ? "You" : message.model));
    this.status = element("span", "msg-status", "");
    head.append(this.status);
    this.body = element("div", "msg-body", message.content);
    this.error = element("div", "msg-error");
    this.error.setAttribute("role", "alert");
    this.error.hidden = true;
    this.sources = element("details", "msg-sources");
    this.sources.hidden = true;
    this.root.append(head, this.body, this.sources, this.error);
    if (message.sources) this.showSources(message.sources);
    this.message = message;
    if (!mine) {
      this.root.tabIndex = 0;
      this.root.title = "Click to look inside this reply";
      this.root.addEventListener("click", (event) => {
        if (!window.getSelection()?.toString()) onInspect(event);
      });
      this.root.addEventListener("keydown", (event) => {
        if (event.key === "Enter") onInspect(event);
      });
    }
    if (message.status === "streaming") this.root.classList.add("streaming");
  }

  append(text) {
    this.body.append(text); // a Text node: model output is never parsed as HTML
  }

  /** The passages retrieval put in the prompt, numbered as the reply cites them. */
  showSources(sources) {
    const summary = element("summary", "", sources.length
      ? `${sources.length} source${sources.length === 1 ? "" : "s"} retrieved`
      : "nothing relevant retrieved: the model was not asked");
    const list = element("ol", "source-list");
    for (const s of sources) {
      const item = element("li", "source");
      item.value = s.number;
      const where = [s.source, ...(s.headings || [])].join(" › ");
      item.append(element("div", "source-where", `[${s.number}] ${where}`),
        element("div", "source-score", `relevance ${s.relevance.toFixed(2)} · score ${s.score.toFixed(3)}`),
        element("div", "source-text", s.text));
      list.append(item);
    }
    this.sources.replaceChildren(summary, list);
    this.sources.open = true;
    this.sources.hidden = false;
  }

  /** Show how the message ended: its stats line, "stopped", or the server's error. */
  finish() {
    const m = this.message;
    this.root.classList.remove("streaming");
    this.root.classList.toggle("stopped", m.status === "stopped");
    this.root.classList.toggle("failed", m.status === "error");
    if (m.role !== "assistant") return;
    if (m.status === "error") {
      this.error.textContent = m.error;
      this.error.hidden = false;
      this.status.textContent = "error";
      return;
    }
    const parts = [];
    if (m.status === "stopped") parts.push("stopped");
    if (m.stats?.completionTokens != null) parts.push(`${m.stats.completionTokens} tokens`);
    if (m.stats?.room != null) parts.push(`at most ${m.stats.room}: the context's room after the prompt`);
    if (m.stats?.tokensPerSecond != null) parts.push(`${m.stats.tokensPerSecond.toFixed(1)} tok/s`);
    if (m.stats?.ttftMs != null) parts.push(`first token ${formatMs(m.stats.ttftMs)}`);
    this.status.textContent = parts.join(" · ");
  }
}

// ---- one turn: tokenize the prompt, stream the reply ------------------------------------------

function samplingRequest() {
  const request = {
    temperature: Number($("temperature-value").value),
    top_p: Number($("top-p-value").value),
    max_tokens: Math.max(1, Math.round(Number($("max-tokens-value").value))),
  };
  const topK = Math.round(Number($("top-k-value").value));
  if (topK > 0) request.top_k = topK;
  return request;
}

async function runTurn(pane, text, signal) {
  pane.add({ role: "user", content: text });
  const model = pane.model;
  const messages = pane.conversation();
  const reply = pane.add({
    role: "assistant", model, content: "", tokens: [], status: "streaming", stats: {},
    prompt: null, promptError: null,
  });
  const user = pane.messages.at(-2);
  pane.inspect(reply);

  // Asked first, as the reply's max_tokens must fit beside the prompt. Not tied to Stop: it is
  // quick, and the view should still show the prompt of a stopped reply.
  try {
    reply.prompt = await api.tokenize({ model, messages, add_generation_prompt: true });
  } catch (err) {
    reply.promptError = err.message;
  }
  pane.inspector.update(reply);

  const body = {
    model, messages, ...samplingRequest(),
    stream_options: { include_usage: true }, logprobs: true, top_logprobs: TOP_LOGPROBS,
  };
  const index = $("rag-index").value;
  if (index) body.retrieval = { index };
  // The server refuses a max_tokens that does not fit beside the prompt (as OpenAI and vLLM
  // do); the slider is a wish, so cut it to the room the prompt leaves in the context.
  const room = reply.prompt ? reply.prompt.max_model_len - reply.prompt.count : 0;
  if (room >= 1 && body.max_tokens > room) {
    body.max_tokens = room;
    reply.stats.room = room;
  }
  const started = performance.now();
  let first = null;
  let last = null;
  const stats = reply.stats;
  const refreshStats = () => {
    const now = last ?? performance.now();
    const n = stats.usageCompletion ?? reply.tokens.length;
    stats.completionTokens = n;
    if (first !== null && n > 1 && now > first) stats.tokensPerSecond = (n - 1) / ((now - first) / 1000);
  };

  try {
    for await (const chunk of api.streamChat(body, signal)) {
      if (chunk.sources && !reply.sources) {
        reply.sources = chunk.sources;
        reply.view.showSources(chunk.sources);
      }
      const choice = chunk.choices?.[0];
      if (choice) {
        const delta = choice.delta?.content ?? "";
        const entries = choice.logprobs?.content ?? [];
        if (delta || entries.length) {
          const now = performance.now();
          if (first === null) {
            first = now;
            stats.ttftMs = now - started;
          }
          last = now;
        }
        if (delta) {
          reply.content += delta;
          reply.view.append(delta);
          pane.scrollToEnd();
        }
        if (entries.length) reply.tokens.push(...entries);
        if (choice.finish_reason) stats.finish = choice.finish_reason;
      }
      if (chunk.usage) {
        stats.usageCompletion = chunk.usage.completion_tokens;
        stats.promptTokens = chunk.usage.prompt_tokens;
      }
      refreshStats();
      pane.inspector.update(reply);
    }
    reply.status = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      reply.status = "stopped";
      stats.finish = "stopped";
    } else {
      reply.status = "error";
      reply.error = err.message;
      reply.failed = user.failed = true; // neither goes into the next turn's history
    }
  }
  refreshStats();
  reply.view.finish();
  pane.inspector.update(reply);
}

async function send() {
  const input = $("prompt");
  const text = input.value.trim();
  if (!text || state.controller) return;
  if (!state.models.length) {
    showBanner("No model to talk to: the server listed none (is it running, and is the API key right?).");
    return;
  }
  input.value = "";
  updateDraftCount();
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const panes = state.compare ? state.panes : state.panes.slice(0, 1);
  try {
    await Promise.all(panes.map((pane) => runTurn(pane, text, controller.signal)));
  } finally {
    state.controller = null;
    setBusy(false);
    input.focus();
  }
}

function stop() {
  state.controller?.abort();
}

function reset() {
  stop();
  popover.unpin();
  for (const pane of state.panes) pane.reset();
  hideBanner();
}

function setBusy(busy) {
  document.body.classList.toggle("busy", busy);
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("mode-chat").disabled = busy;
  $("mode-compare").disabled = busy;
}

// ---- compare mode ----------------------------------------------------------------------------

function setCompare(on, { save = true } = {}) {
  state.compare = on;
  document.body.classList.toggle("comparing", on);
  $("mode-chat").setAttribute("aria-pressed", String(!on));
  $("mode-compare").setAttribute("aria-pressed", String(on));
  const [a, b] = state.panes;
  if (on && !b.messages.length && a.messages.length) b.copyFrom(a);
  fitMaxTokens();
  if (save) saveSettings();
}

// ---- models, settings, API key ---------------------------------------------------------------

async function loadModels() {
  const status = $("server-status");
  status.textContent = "connecting…";
  status.className = "server-status";
  try {
    state.models = (await api.models()).filter((m) => m.task !== "embed");
    state.indexes = await api.ragIndexes();
  } catch (err) {
    state.models = [];
    fillModelSelects();
    status.textContent = err.status === 401 ? "API key needed" : "not connected";
    status.classList.add("bad");
    showBanner(err.status === 401
      ? `The server wants an API key: enter it at the top right. (${err.message})`
      : `Could not list the models: ${err.message}`);
    return;
  }
  hideBanner();
  fillModelSelects();
  fillIndexSelect();
  const n = state.models.length;
  status.textContent = n ? `${n} model${n === 1 ? "" : "s"} · connected` : "no models";
  status.classList.add(n ? "good" : "bad");
}

function fillModelSelects() {
  const saved = loadSettings();
  state.panes.forEach((pane, i) => {
    const select = pane.modelSelect;
    const previous = select.value || saved[`model_${pane.letter}`];
    select.replaceChildren(...state.models.map((m) => {
      const option = element("option", "", m.id);
      option.value = m.id;
      return option;
    }));
    const ids = state.models.map((m) => m.id);
    if (ids.includes(previous)) select.value = previous;
    else if (ids.length) select.value = ids[Math.min(i, ids.length - 1)]; // B defaults to another model
    pane.modelChanged();
  });
  fitMaxTokens();
}

function fillIndexSelect() {
  const select = $("rag-index");
  const previous = select.value || loadSettings().rag_index || "";
  const off = element("option", "", "none: the model answers alone");
  off.value = "";
  select.replaceChildren(off, ...state.indexes.map((index) => {
    const option = element("option", "", `${index.name} (${index.passages.toLocaleString()} passages)`);
    option.value = index.name;
    return option;
  }));
  select.value = state.indexes.some((index) => index.name === previous) ? previous : "";
  $("retrieval-section").hidden = !state.indexes.length;
}

/**
 * The max-tokens control can go as far as the smallest context among the models in use,
 * less one token for the prompt; each turn then cuts it to what its prompt leaves.
 */
function fitMaxTokens() {
  const inUse = state.panes.slice(0, state.compare ? 2 : 1).map((p) => p.model);
  const limits = state.models.filter((m) => inUse.includes(m.id) && m.max_model_len).map((m) => m.max_model_len);
  if (!limits.length) {
    $("context-limit").textContent = "";
    return;
  }
  const context = Math.min(...limits);
  const limit = Math.max(context - 1, 1);
  $("context-limit").textContent = `The model's context is ${context} tokens, prompt and reply together: `
    + "a reply gets at most what the prompt leaves.";
  $("max-tokens").max = String(Math.min(limit, 2048));
  $("max-tokens-value").max = String(limit);
  if (Number($("max-tokens-value").value) > limit) setControl("max-tokens", limit);
}

const CONTROLS = ["temperature", "top-p", "top-k", "max-tokens"];

/** Keep each slider and its number box in step. */
function setControl(name, value) {
  $(name).value = String(value);
  $(`${name}-value`).value = String(value);
}

function loadSettings() {
  try {
    return JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}") || {};
  } catch {
    return {};
  }
}

function saveSettings() {
  const settings = { system: $("system-prompt").value, compare: state.compare };
  for (const name of CONTROLS) settings[name] = $(`${name}-value`).value;
  for (const pane of state.panes) settings[`model_${pane.letter}`] = pane.model;
  settings.rag_index = $("rag-index").value;
  try {
    localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(settings));
  } catch {
    // storage full or disabled: settings just don't persist
  }
}

function restoreSettings() {
  const saved = loadSettings();
  if (typeof saved.system === "string") $("system-prompt").value = saved.system;
  for (const name of CONTROLS) {
    if (saved[name] !== undefined && saved[name] !== "") setControl(name, saved[name]);
  }
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  if (saved.compare) setCompare(true, { save: false });
}

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

// ---- live token count of the draft -----------------------------------------------------------

let draftTimer = null;
let draftController = null;

function updateDraftCount() {
  clearTimeout(draftTimer);
  draftController?.abort();
  const text = $("prompt").value;
  const label = $("draft-count");
  if (!text.trim() || !state.models.length) {
    label.textContent = "";
    return;
  }
  draftTimer = setTimeout(async () => {
    draftController = new AbortController();
    try {
      const result = await api.tokenize({ model: state.panes[0].model, prompt: text }, draftController.signal);
      label.textContent = `${result.count} token${result.count === 1 ? "" : "s"}`;
    } catch (err) {
      if (err.name !== "AbortError") label.textContent = "";
    }
  }, 300);
}

// ---- wiring ----------------------------------------------------------------------------------

function wire() {
  state.panes = [new Pane(0), new Pane(1)];

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    } else if (event.key === "Escape" && state.controller) {
      stop();
    }
  });
  $("prompt").addEventListener("input", updateDraftCount);
  $("stop").addEventListener("click", stop);
  $("reset").addEventListener("click", reset);
  $("mode-chat").addEventListener("click", () => setCompare(false));
  $("mode-compare").addEventListener("click", () => setCompare(true));

  for (const pane of state.panes) {
    pane.modelSelect.addEventListener("change", () => {
      pane.modelChanged();
      fitMaxTokens();
      saveSettings();
    });
  }
  for (const name of CONTROLS) {
    const slider = $(name);
    const box = $(`${name}-value`);
    slider.addEventListener("input", () => {
      box.value = slider.value;
      saveSettings();
    });
    box.addEventListener("input", () => {
      if (box.value !== "") slider.value = box.value;
      saveSettings();
    });
    box.addEventListener("change", () => { // typed past the limit: back to it
      if (box.max !== "" && Number(box.value) > Number(box.max)) setControl(name, box.max);
    });
  }
  $("system-prompt").addEventListener("input", saveSettings);
  $("rag-index").addEventListener("change", saveSettings);

  $("api-key-form").addEventListener("submit", (event) => event.preventDefault());
  let keyTimer = null;
  $("api-key").addEventListener("input", () => {
    clearTimeout(keyTimer);
    keyTimer = setTimeout(() => {
      try {
        localStorage.setItem(KEY_STORAGE, $("api-key").value);
      } catch {
        // storage disabled: the key lasts until the page is closed
      }
      loadModels();
    }, 400);
  });

  restoreSettings();
  loadModels();
}

wire();
