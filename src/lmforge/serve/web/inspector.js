// "Inside the model" for one chat pane: what the model read (the prompt as tokens and ids,
// and how much of its context that fills), what it wrote (each token coloured by its
// probability), and how fast (time to first token vs tokens per second).

import { renderPromptTokens, replyChip } from "./tokens.js";

const LETTERS = ["a", "b"];

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export class Inspector {
  constructor(index, popover) {
    this.index = index;
    this.message = null;
    this.renderedTokens = 0;
    this.renderedPrompt = null;

    const letter = LETTERS[index];
    this.root = element("section", `inspect pane-${letter}`);
    this.root.dataset.pane = letter;

    const head = element("header", "inspect-head");
    this.title = element("h3", "inspect-model", "—");
    this.which = element("span", "inspect-which", "");
    head.append(element("span", `pane-dot ${letter}`), this.title, this.which);

    this.stats = element("dl", "stats");
    this.statValues = {};
    for (const [key, label, tip] of [
      ["ttft", "first token", "Time to first token: queueing plus prefill, one forward pass over the whole prompt"],
      ["rate", "tokens/s", "Decode speed: one forward pass per new token, after the first"],
      ["completion", "reply tokens", "Tokens generated so far"],
      ["prompt", "prompt tokens", "Tokens the model read before answering"],
      ["finish", "finish", "Why the reply ended: stop (end-of-turn token), length (max tokens), stopped (you)"],
    ]) {
      const cell = element("div", `stat stat-${key}`);
      cell.title = tip;
      const value = element("dd", "", "–");
      cell.append(element("dt", "", label), value);
      this.stats.append(cell);
      this.statValues[key] = value;
    }

    this.promptHeading = element("h4", "prompt-heading", "Prompt");
    this.contextBar = element("div", "context-bar");
    this.contextFill = element("span", "context-fill");
    this.contextBar.append(this.contextFill);
    this.contextBar.hidden = true;
    this.promptNote = element("p", "hint", "What the model reads: the chat template turns the "
      + "conversation into one sequence; each chip is a token, with its id in the vocabulary below it.");
    this.promptStrip = element("div", "strip prompt-strip");

    this.replyHeading = element("h4", "reply-heading", "Reply");
    this.replyNote = element("p", "hint", "Each generated token, coloured by the probability the model "
      + "gave it. Hover or click a token to see the alternatives.");
    this.replyStrip = element("div", "strip reply-strip");
    popover.watch(this.replyStrip);

    this.empty = element("p", "inspect-empty", "Send a message to look inside the model.");
    this.body = element("div", "inspect-body");
    // The reply first: it is what changes with every turn, while the prompt only grows.
    this.body.append(this.stats, this.replyHeading, this.replyNote, this.replyStrip,
      this.promptHeading, this.contextBar, this.promptNote, this.promptStrip);
    this.body.hidden = true;
    this.root.append(head, this.empty, this.body);
  }

  setModel(name) {
    if (!this.message) this.title.textContent = name || "—";
  }

  clear(modelName) {
    this.message = null;
    this.title.textContent = modelName || "—";
    this.which.textContent = "";
    this.body.hidden = true;
    this.empty.hidden = false;
  }

  /** Show one assistant message (the latest, or one the user clicked). */
  show(message, { latest = true } = {}) {
    this.message = message;
    this.renderedTokens = 0;
    this.renderedPrompt = null;
    this.title.textContent = message.model;
    this.which.textContent = latest ? "latest reply" : "earlier reply";
    this.replyStrip.replaceChildren();
    this.promptStrip.replaceChildren();
    this.body.hidden = false;
    this.empty.hidden = true;
    this.update(message);
  }

  /** Bring the view up to date with `message` as its stream progresses (appends only). */
  update(message) {
    if (message !== this.message) return;
    this.renderPrompt(message);
    const tokens = message.tokens;
    if (tokens.length > this.renderedTokens) {
      const fragment = document.createDocumentFragment();
      for (let i = this.renderedTokens; i < tokens.length; i++) fragment.append(replyChip(tokens[i], i));
      this.replyStrip.append(fragment);
      this.renderedTokens = tokens.length;
    }
    this.replyHeading.textContent = tokens.length ? `Reply: ${tokens.length} tokens` : "Reply";
    if (!tokens.length && message.status !== "streaming") {
      this.replyStrip.replaceChildren(element("span", "hint", message.error ? "no tokens: the request failed"
        : "no token probabilities were sent"));
    }
    this.renderStats(message);
  }

  renderPrompt(message) {
    const prompt = message.prompt;
    if (prompt === this.renderedPrompt) return;
    this.renderedPrompt = prompt;
    if (!prompt) {
      this.promptHeading.textContent = "Prompt";
      this.contextBar.hidden = true;
      this.promptStrip.replaceChildren(element("span", "hint", message.promptError
        ? `could not tokenize: ${message.promptError}` : "tokenizing…"));
      return;
    }
    const limit = prompt.max_model_len;
    const share = limit ? ` · ${(100 * prompt.count / limit).toFixed(prompt.count / limit < 0.01 ? 2 : 1)}% of the `
      + `${limit.toLocaleString("en")}-token context` : "";
    this.promptHeading.textContent = `Prompt: ${prompt.count} tokens${share}`;
    this.contextBar.hidden = !limit;
    if (limit) this.contextFill.style.setProperty("width", `${Math.min(100, 100 * prompt.count / limit)}%`);
    renderPromptTokens(this.promptStrip, prompt.token_strs, prompt.tokens);
  }

  renderStats(message) {
    const stats = message.stats;
    const values = this.statValues;
    values.ttft.textContent = stats.ttftMs == null ? "–" : formatMs(stats.ttftMs);
    values.rate.textContent = stats.tokensPerSecond == null ? "–" : stats.tokensPerSecond.toFixed(1);
    values.completion.textContent = String(stats.completionTokens ?? message.tokens.length);
    values.prompt.textContent = stats.promptTokens == null ? (message.prompt ? String(message.prompt.count) : "–")
      : String(stats.promptTokens);
    values.finish.textContent = message.status === "streaming" ? "…" : (stats.finish ?? message.status);
  }
}

export function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}
