// How tokens look on screen: prompt tokens as coloured chips with their vocabulary ids,
// generated tokens coloured by the probability the model gave them, and the popover that
// shows the alternatives it considered. All model text goes in through textContent only.

const PROMPT_COLOURS = 6;

/** A token's text with its invisible characters made visible (a space is a "·"). */
export function visibleText(text, bytes) {
  if ((text === undefined || text === null || text.includes("\uFFFD")) && Array.isArray(bytes) && bytes.length) {
    text = bytesAsText(bytes); // part of a multi-byte character: show those bytes, not a "�"
  }
  if (!text) return "∅";
  return text.replaceAll(" ", "·").replaceAll("\n", "↵").replaceAll("\t", "⇥").replaceAll("\r", "␍");
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** Bytes as text where they are whole UTF-8 characters, and as <0xC3> where they are not. */
function bytesAsText(bytes) {
  let out = "";
  for (let i = 0; i < bytes.length;) {
    const lead = bytes[i];
    const length = lead < 0x80 ? 1 : lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : lead >= 0xc0 ? 2 : 0;
    if (length && i + length <= bytes.length) {
      try {
        out += utf8.decode(new Uint8Array(bytes.slice(i, i + length)));
        i += length;
        continue;
      } catch {
        // not a valid character: fall through to the byte itself
      }
    }
    out += `<0x${lead.toString(16).toUpperCase().padStart(2, "0")}>`;
    i += 1;
  }
  return out;
}

/** Special tokens (`<|im_start|>`, `<s>`, `</s>`, ...) are drawn differently from text. */
function looksSpecial(text) {
  return /^<\|[^|]*\|>$/.test(text) || /^<\/?s>$/.test(text) || /^<[a-z_]+>$/.test(text);
}

/** A probability as a short percentage: 83.1%, 4.2%, 0.031%, <0.001%. */
export function percent(p) {
  const value = p * 100;
  if (value >= 99.95) return value >= 100 ? "100%" : "99.9%";
  if (value >= 1) return `${value.toFixed(1)}%`;
  if (value >= 0.001) return `${value.toPrecision(2)}%`;
  return "<0.001%";
}

/** Red (unlikely) through amber to green (confident), as an HSL hue. */
export function probabilityHue(p) {
  return Math.round(Math.max(0, Math.min(1, p)) * 130);
}

/** The prompt's tokens: one chip per token, neighbours in different colours, id underneath. */
export function renderPromptTokens(container, tokenStrs, ids) {
  const fragment = document.createDocumentFragment();
  tokenStrs.forEach((text, i) => {
    const chip = document.createElement("span");
    chip.className = `tok prompt-tok c${i % PROMPT_COLOURS}`;
    if (looksSpecial(text)) chip.classList.add("special");
    const label = document.createElement("span");
    label.className = "tok-text";
    label.textContent = visibleText(text);
    const id = document.createElement("span");
    id.className = "tok-id";
    id.textContent = String(ids[i]);
    chip.append(label, id);
    chip.title = `token ${i}: id ${ids[i]}`;
    fragment.append(chip);
    if (text.includes("\n")) fragment.append(Object.assign(document.createElement("span"), { className: "line-break" }));
  });
  container.replaceChildren(fragment);
}

/** One generated token, coloured by the probability of the choice, focusable for the popover. */
export function replyChip(entry, index) {
  const p = Math.exp(entry.logprob);
  const chip = document.createElement("span");
  chip.className = "tok reply-tok";
  chip.tabIndex = 0;
  chip.setAttribute("role", "button");
  chip.setAttribute("aria-label", `token ${index + 1}, probability ${percent(p)}`);
  chip.style.setProperty("--hue", String(probabilityHue(p)));
  chip.dataset.p = p.toFixed(4);
  chip.textContent = visibleText(entry.token, entry.bytes);
  chip.tokenEntry = entry;
  return chip;
}

/**
 * The card that shows a generated token's probability and the top alternatives. Hovering
 * or focusing a token shows it; clicking pins it until Escape or a click elsewhere.
 */
export class TokenPopover {
  constructor(element) {
    this.element = element;
    this.pinned = null;
    this.shownFor = null;
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape") this.unpin();
    });
    document.addEventListener("click", (event) => {
      if (this.pinned && !event.target.closest(".reply-tok") && !this.element.contains(event.target)) this.unpin();
    });
    window.addEventListener("resize", () => this.reposition());
    document.addEventListener("scroll", () => this.reposition(), true);
  }

  /** Hover, focus and click handling for every reply chip inside `container`. */
  watch(container) {
    container.addEventListener("mouseover", (event) => {
      const chip = event.target.closest(".reply-tok");
      if (chip && !this.pinned) this.show(chip);
    });
    container.addEventListener("mouseout", (event) => {
      const chip = event.target.closest(".reply-tok");
      if (chip && !this.pinned && !chip.contains(event.relatedTarget)) this.hide();
    });
    container.addEventListener("focusin", (event) => {
      const chip = event.target.closest(".reply-tok");
      if (chip && !this.pinned) this.show(chip);
    });
    container.addEventListener("focusout", () => {
      if (!this.pinned) this.hide();
    });
    container.addEventListener("click", (event) => {
      const chip = event.target.closest(".reply-tok");
      if (!chip) return;
      if (this.pinned === chip) {
        this.unpin();
      } else {
        this.pin(chip);
      }
    });
    container.addEventListener("keydown", (event) => {
      const chip = event.target.closest(".reply-tok");
      if (chip && (event.key === "Enter" || event.key === " ")) {
        event.preventDefault();
        chip.click();
      }
    });
  }

  pin(chip) {
    this.pinned?.classList.remove("pinned");
    this.pinned = chip;
    chip.classList.add("pinned");
    this.show(chip);
  }

  unpin() {
    this.pinned?.classList.remove("pinned");
    this.pinned = null;
    this.hide();
  }

  hide() {
    this.element.hidden = true;
    this.shownFor = null;
  }

  show(chip) {
    const entry = chip.tokenEntry;
    if (!entry) return;
    this.shownFor = chip;
    this.element.replaceChildren(card(entry));
    this.element.hidden = false;
    this.reposition();
  }

  /** Below the token, or above it when there is no room; always inside the window. */
  reposition() {
    const chip = this.shownFor;
    if (!chip || this.element.hidden) return;
    if (!chip.isConnected) {
      this.unpin();
      return;
    }
    const at = chip.getBoundingClientRect();
    const box = this.element.getBoundingClientRect();
    const margin = 8;
    // Beside the panel the token sits in, when there is room, so the card hides no other token.
    const panel = chip.closest(".inspector")?.getBoundingClientRect();
    if (panel && panel.left - 2 * margin >= box.width) {
      const top = Math.min(Math.max(margin, at.top - box.height / 2), window.innerHeight - box.height - margin);
      this.element.style.setProperty("top", `${top}px`);
      this.element.style.setProperty("left", `${panel.left - box.width - margin}px`);
      return;
    }
    let top = at.bottom + margin;
    if (top + box.height > window.innerHeight - margin) top = Math.max(margin, at.top - box.height - margin);
    const left = Math.min(Math.max(margin, at.left), window.innerWidth - box.width - margin);
    this.element.style.setProperty("top", `${top}px`);
    this.element.style.setProperty("left", `${left}px`);
  }
}

/** The popover's content for one generated token. */
function card(entry) {
  const p = Math.exp(entry.logprob);
  const root = document.createElement("div");

  const head = document.createElement("div");
  head.className = "pop-head";
  const chosen = document.createElement("span");
  chosen.className = "tok reply-tok";
  chosen.style.setProperty("--hue", String(probabilityHue(p)));
  chosen.textContent = visibleText(entry.token, entry.bytes);
  const prob = document.createElement("span");
  prob.className = "pop-prob";
  prob.textContent = percent(p);
  const logprob = document.createElement("span");
  logprob.className = "pop-logprob";
  logprob.textContent = `logprob ${entry.logprob.toFixed(3)}`;
  head.append(chosen, prob, logprob);
  root.append(head);

  if (Array.isArray(entry.bytes) && entry.bytes.length) {
    const bytes = document.createElement("div");
    bytes.className = "pop-bytes";
    bytes.textContent = `UTF-8 bytes: ${entry.bytes.map((b) => b.toString(16).padStart(2, "0")).join(" ")}`;
    root.append(bytes);
  }

  const alternatives = [...(entry.top_logprobs || [])].sort((a, b) => b.logprob - a.logprob);
  if (!alternatives.length) {
    const none = document.createElement("p");
    none.className = "pop-note";
    none.textContent = "The server sent no alternatives for this token.";
    root.append(none);
    return root;
  }

  const title = document.createElement("div");
  title.className = "pop-title";
  title.textContent = `The ${alternatives.length} most likely tokens at this step`;
  root.append(title);

  const table = document.createElement("table");
  table.className = "alternatives";
  let covered = 0;
  let chosenListed = false;
  alternatives.forEach((alt, rank) => {
    const q = Math.exp(alt.logprob);
    covered += q;
    const isChosen = alt.token === entry.token && Math.abs(alt.logprob - entry.logprob) < 1e-4;
    chosenListed ||= isChosen;
    const row = table.insertRow();
    if (isChosen) row.className = "chosen";
    row.insertCell().textContent = String(rank + 1);
    const tokenCell = row.insertCell();
    const tok = document.createElement("span");
    tok.className = "tok alt-tok";
    tok.textContent = visibleText(alt.token, alt.bytes);
    tokenCell.append(tok);
    const barCell = row.insertCell();
    barCell.className = "bar-cell";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.setProperty("width", `${(q * 100).toFixed(1)}%`);
    bar.style.setProperty("--hue", String(probabilityHue(q)));
    barCell.append(bar);
    const value = row.insertCell();
    value.className = "num";
    value.textContent = percent(q);
  });
  root.append(table);

  const note = document.createElement("p");
  note.className = "pop-note";
  const rest = Math.max(0, 1 - covered);
  note.textContent = `These cover ${percent(Math.min(1, covered))} of the probability; every other token in the `
    + `vocabulary shares the remaining ${percent(rest)}.`;
  if (!chosenListed) {
    note.textContent += " The chosen token is not among them: sampling picked an unlikely one.";
  }
  root.append(note);
  return root;
}
