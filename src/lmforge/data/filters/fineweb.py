"""FineWeb's own filters (Penedo et al. 2024), found by comparing models trained on kept
and removed data.

After the Gopher and C4 rules, the FineWeb authors looked at what still got through
and trained small models to check which extra rules helped. Three survived, plus a
fourth for list-like pages:

- ``fineweb_line_punct_ratio``: at most 12% of lines end in terminal punctuation. Prose
  ends its lines with full stops; navigation, product grids and tag clouds don't.
- ``fineweb_short_lines``: at least 67% of lines are 30 characters or shorter (menus,
  tables of links).
- ``fineweb_char_dup_ratio``: at least 1% of the characters sit in lines that repeat an
  earlier line (repeated boilerplate inside one page).
- ``fineweb_list_ratio``: more than 0.3 newlines per word (one- or two-word lines: lists).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.data.document import Document
from lmforge.data.filters.gopher import duplicate_fractions
from lmforge.data.filters.words import TERMINAL_PUNCTUATION, lines_of, words_of


@dataclass
class FineWebConfig:
    enabled: bool = True
    line_punct_threshold: float = 0.12  # drop when the share of punctuated lines is <= this
    line_punct_exclude_zero: bool = False  # true keeps pages with no punctuated line at all
    short_line_threshold: float = 0.67  # drop when the share of short lines is >= this
    short_line_length: int = 30
    char_duplicates_threshold: float = 0.01  # drop when the share of repeated-line chars is >= this
    new_line_ratio: float = 0.3  # drop when newlines per word exceed this


class FineWebFilter:
    """Stage: FineWeb's line-punctuation, short-line, duplicate-character and list rules."""

    name = "fineweb"

    def __init__(self, config: FineWebConfig | None = None) -> None:
        self.config = config or FineWebConfig()

    def __call__(self, doc: Document) -> str | None:
        cfg = self.config
        lines = lines_of(doc.text)
        if not lines:
            return "fineweb_empty"
        punct_ratio = sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines)
        if punct_ratio <= cfg.line_punct_threshold and not (punct_ratio == 0 and cfg.line_punct_exclude_zero):
            return "fineweb_line_punct_ratio"
        if sum(len(line) <= cfg.short_line_length for line in lines) / len(lines) >= cfg.short_line_threshold:
            return "fineweb_short_lines"
        _, dup_char_fraction = duplicate_fractions(lines)
        if dup_char_fraction >= cfg.char_duplicates_threshold:
            return "fineweb_char_dup_ratio"
        words = words_of(doc.text)
        if doc.text.count("\n") / max(1, len(words)) > cfg.new_line_ratio:
            return "fineweb_list_ratio"
        return None
