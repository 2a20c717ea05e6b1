"""Documents -> chunks: the passages an index stores, a search returns and a prompt quotes.

Why chunk at all: an encoder reads a bounded number of tokens (all-MiniLM-L6-v2: 256
word pieces, trained on 128) and silently drops the rest, and one vector for a long page
averages many topics into none. Short chunks retrieve precisely but lose the context
that makes them understandable; long ones keep it but dilute the match and fill the
prompt. Overlap keeps a sentence that straddles a boundary whole in at least one chunk.

Two ways to cut, both measured in the embedder's tokens (`count_tokens`, any callable
that counts the tokens of a text without special tokens):

- **tokens**: windows of at most `max_tokens` tokens over the words of the whole text,
  each starting about `overlap` tokens before the previous one ended. Blind to the
  text's shape, so a window may start mid-paragraph.
- **structure**: sections at headings (Markdown ``#``; reST, setext and plain-text
  underlines; HTML through its extraction as Markdown), then paragraphs (blank-line
  blocks) packed into chunks of at most `max_tokens`; a paragraph too long for one chunk
  is cut at its lines, and a line too long at token windows (with overlap). A chunk never
  spans two sections, and keeps its heading path ("Installing > On Windows").
- **none**: one chunk per document, for corpora that come already cut (benchmarks).

Tokens are counted word by word (whitespace-separated) and summed, each distinct word
counted once: exact for WordPiece, whose pre-tokenizer splits on whitespace anyway, and
within a few percent for byte-level BPE. `start`/`end` are character offsets into the
document's text as lmforge reads it (the file for text, Markdown and reST; the extracted
main text for HTML); a chunk's `text` is that span, except that reST markup is removed
from it after cutting (`lmforge.data.rst`), so offsets still point into the source.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from lmforge.data.rst import rst_to_text

CountTokens = Callable[[str], int]
MODES = ("structure", "tokens", "none")
MARKUPS = ("markdown", "rst", "text")

_WORD = re.compile(r"\S+")
_ATX = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>.:_])\1{2,}[ \t]*$")
_FENCE = re.compile(r"^[ \t]*(```|~~~)")
_PERMALINK = "\u00b6"  # Sphinx's pilcrow after every heading of its HTML


@dataclass(frozen=True)
class ChunkConfig:
    """How documents are cut; part of an index's manifest, so a change re-chunks every document."""

    mode: str = "structure"
    max_tokens: int = 200
    overlap: int = 40

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown chunking {self.mode!r}; choose from {', '.join(MODES)}")
        if self.max_tokens < 8:
            raise ValueError(f"chunks need at least 8 tokens, got --chunk-tokens {self.max_tokens}")
        if not 0 <= self.overlap < self.max_tokens:
            raise ValueError(f"--overlap must be at least 0 and below --chunk-tokens ({self.max_tokens}), "
                             f"got {self.overlap}")


@dataclass(frozen=True)
class Chunk:
    """A passage of a document, with where it came from."""

    text: str
    source: str  # the file (as named on the command line) or the page's URL
    doc_id: str
    number: int  # 0, 1, ... in document order
    start: int  # character offsets of the passage in the document's text
    end: int
    headings: tuple[str, ...] = ()  # outermost first

    @property
    def indexed_text(self) -> str:
        """What is embedded and BM25-indexed: the heading path, then the passage."""
        return f"{' > '.join(self.headings)}\n{self.text}" if self.headings else self.text


class TokenCounter:
    """`count_tokens` word by word, each distinct word counted once (see the module docstring)."""

    def __init__(self, count_tokens: CountTokens) -> None:
        self.count_tokens = count_tokens
        self.cache: dict[str, int] = {}

    def words(self, text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
        """(start, end, tokens) of each word of text[start:end], offsets into `text`."""
        found = []
        for match in _WORD.finditer(text, start, len(text) if end is None else end):
            word = match.group()
            tokens = self.cache.get(word)
            if tokens is None:
                tokens = self.cache[word] = max(1, self.count_tokens(word))
            found.append((match.start(), match.end(), tokens))
        return found

    def __call__(self, text: str) -> int:
        return sum(tokens for _, _, tokens in self.words(text))


def token_windows(words: list[tuple[int, int, int]], max_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans of windows of at most `max_tokens` over `words`, overlapping by <= `overlap` tokens.

    A window takes words while they fit (a single word longer than the budget is a window
    of its own); the next one starts at the earliest word that keeps the tokens shared
    with the previous window within `overlap`, and always at least one word later.
    """
    spans = []
    i = 0
    while i < len(words):
        j, total = i, 0
        while j < len(words) and (j == i or total + words[j][2] <= max_tokens):
            total += words[j][2]
            j += 1
        spans.append((words[i][0], words[j - 1][1]))
        if j == len(words):
            break
        k, shared = j, 0
        while k - 1 > i and shared + words[k - 1][2] <= overlap:
            shared += words[k - 1][2]
            k -= 1
        i = k
    return spans


# ============================================================================ structure
@dataclass
class _Section:
    headings: tuple[str, ...]
    blocks: list[tuple[int, int]] = field(default_factory=list)  # paragraph spans


def _lines(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, line) for each line of text, offsets without the newline."""
    start = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        yield start, start + len(body), body
        start += len(line)


def _clean_heading(title: str, markup: str) -> str:
    title = title.replace(_PERMALINK, "").strip()
    if markup == "rst":
        title = rst_to_text(title)
    elif markup == "markdown":  # `code` and *emphasis* marks
        title = title.replace("`", "").replace("**", "")
    return " ".join(title.split())


def sections(text: str, markup: str = "text") -> list[_Section]:
    """The text cut at its headings, each section's paragraphs as character spans.

    Markdown's ``# Title`` sets the level by its hashes; an underlined title (reST,
    Markdown's setext, plain text) gets its level from the order in which underline
    styles first appear, reST's own rule (an overlined style differs from the same
    character underlined only). An underline must be at least as long as its title, so a
    ``---`` rule under a sentence is not taken for one. Nothing inside a fenced code block
    is a heading.
    """
    if markup not in MARKUPS:
        raise ValueError(f"unknown markup {markup!r}; choose from {', '.join(MARKUPS)}")
    lines = list(_lines(text))
    styles: list[tuple[str, bool]] = []
    path: list[tuple[int, str]] = []
    current = _Section(())
    found = [current]
    block: list[int] = []  # start and end of the paragraph being read
    fenced = False
    i = 0

    def close_block() -> None:
        if block:
            current.blocks.append((block[0], block[1]))
            block.clear()

    def open_section(level: int, title: str) -> None:
        nonlocal current
        close_block()
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, _clean_heading(title, markup)))
        current = _Section(tuple(t for _, t in path))
        found.append(current)

    while i < len(lines):
        start, end, line = lines[i]
        if markup == "markdown" and _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (heading := _heading_at(lines, i, markup, styles)) is not None:
            level, title, used = heading
            open_section(level, title)
            i += used
            continue
        if not line.strip() and not fenced:
            close_block()
        elif block:
            block[1] = end
        else:
            block.extend((start, end))
        i += 1
    close_block()
    return [s for s in found if s.blocks]


def _heading_at(lines: list[tuple[int, int, str]], i: int, markup: str,
                styles: list[tuple[str, bool]]) -> tuple[int, str, int] | None:
    """(level, title, lines used) if a heading starts at line i, else None."""
    line = lines[i][2]
    if markup == "markdown" and (atx := _ATX.match(line)):
        return len(atx.group(1)), atx.group(2), 1
    overline = _UNDERLINE.match(line)
    if overline and i + 2 < len(lines):  # ====\nTitle\n==== (reST's overlined style)
        title, under = lines[i + 1][2], lines[i + 2][2]
        if title.strip() and under.strip() == line.strip() and len(line.strip()) >= len(title.strip()):
            return _style_level(styles, (line.strip()[0], True)), title.strip(), 3
    if not line.strip() or (markup == "rst" and line[:1].isspace()) or i + 1 >= len(lines):
        return None
    if i > 0 and lines[i - 1][2].strip():  # a title stands alone: a blank line (or nothing) before it
        return None
    under = _UNDERLINE.match(lines[i + 1][2])
    if under is None or _UNDERLINE.match(line) or len(lines[i + 1][2].strip()) < len(line.strip()):
        return None
    if markup == "markdown":  # setext: = is level 1, - level 2, nothing else
        return (1 if under.group(1) == "=" else 2, line.strip(), 2) if under.group(1) in "=-" else None
    return _style_level(styles, (under.group(1), False)), line.strip(), 2


def _style_level(styles: list[tuple[str, bool]], style: tuple[str, bool]) -> int:
    if style not in styles:
        styles.append(style)
    return styles.index(style) + 1


# ============================================================================ chunking
def chunk_text(text: str, count_tokens: CountTokens | TokenCounter, config: ChunkConfig, *,
               source: str = "", doc_id: str = "", markup: str = "text",
               title: str | None = None) -> list[Chunk]:
    """Cut one document's text into chunks (see the module docstring for the three modes).

    `title` (a document's own name, e.g. a Wikipedia title) becomes the first heading.
    """
    counter = count_tokens if isinstance(count_tokens, TokenCounter) else TokenCounter(count_tokens)
    top = (title,) if title else ()
    if config.mode == "none":
        stripped = text.strip()
        spans = [(_Span(text.find(stripped), text.find(stripped) + len(stripped), top))] if stripped else []
    elif config.mode == "tokens":
        spans = [_Span(s, e, top) for s, e in token_windows(counter.words(text), config.max_tokens,
                                                             config.overlap)]
    else:
        spans = [_Span(s, e, top + section.headings) for section in sections(text, markup)
                 for s, e in _pack(text, section.blocks, counter, config)]
    chunks = []
    for span in spans:
        piece = text[span.start:span.end]
        if markup == "rst":
            piece = rst_to_text(piece).strip()
        if piece.strip():
            chunks.append(Chunk(piece, source, doc_id, len(chunks), span.start, span.end, span.headings))
    return chunks


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    headings: tuple[str, ...]


def _pack(text: str, blocks: list[tuple[int, int]], counter: TokenCounter,
          config: ChunkConfig) -> list[tuple[int, int]]:
    """Paragraphs packed greedily into spans of at most `max_tokens`; oversize paragraphs cut smaller."""
    units: list[tuple[int, int, int]] = []  # start, end, tokens: pieces no longer than max_tokens
    for start, end in blocks:
        units += _fit(text, start, end, counter, config)
    spans: list[tuple[int, int]] = []
    current: list[int] = []  # start, end, tokens of the span being filled
    for start, end, tokens in units:
        if current and current[2] + tokens <= config.max_tokens:
            current[1], current[2] = end, current[2] + tokens
            continue
        if current:
            spans.append((current[0], current[1]))
        current = [start, end, tokens]
    if current:
        spans.append((current[0], current[1]))
    return spans


def _fit(text: str, start: int, end: int, counter: TokenCounter,
         config: ChunkConfig) -> list[tuple[int, int, int]]:
    """A paragraph as pieces of at most `max_tokens`: whole, else its lines, else token windows."""
    words = counter.words(text, start, end)
    tokens = sum(t for _, _, t in words)
    if tokens <= config.max_tokens:
        return [(start, end, tokens)] if words else []
    pieces = []
    for line_start, line_end, _ in _lines(text[start:end]):
        line_words = counter.words(text, start + line_start, start + line_end)
        line_tokens = sum(t for _, _, t in line_words)
        if not line_words:
            continue
        if line_tokens <= config.max_tokens:
            pieces.append((line_words[0][0], line_words[-1][1], line_tokens))
            continue
        for s, e in token_windows(line_words, config.max_tokens, config.overlap):
            pieces.append((s, e, sum(t for ws, we, t in line_words if ws >= s and we <= e)))
    return pieces
