"""The Gopher rules (Rae et al. 2021, MassiveText): quality and repetition heuristics.

DeepMind built these for the Gopher model's web data, and FineWeb kept them with the
published thresholds (the defaults below). They are cheap, language-agnostic for
space-separated scripts, and each catches a kind of page that is not prose:

Quality (`GopherQuality`): too few words (a stub) or too many (a dump); mean word
length outside 3-10 characters (tables of numbers, run-together tokens); many ``#`` or
``...`` per word (hashtag spam, truncated teasers); nearly all lines bullets (menus);
many lines ending in an ellipsis (lists of truncated links); fewer than 80% of words
containing a letter (numbers, code, symbols); fewer than two of eight very common
English words (the, be, to, of, and, that, have, with) - real English prose always has
them, keyword lists and boilerplate often don't.

Repetition (`GopherRepetition`): pages that say the same thing again and again
(templated pages, spam, SEO). Measured as the share of lines/paragraphs that repeat
an earlier one (by count and by characters), the share of characters in the single
most frequent 2-, 3-, 4-gram, and the share of characters covered by 5- to 10-grams
that occur more than once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from lmforge.data.document import Document
from lmforge.data.filters.words import lines_of, words_of

_LETTER = re.compile(r"[^\W\d_]")  # a letter in any script
BULLETS = ("-", "*", "•", "‣", "◦", "▪", "●", "○", "■", "□", "–", "➢", "→", "·")
ELLIPSES = ("...", "…")


@dataclass
class GopherQualityConfig:
    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: list[str] = field(
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])


class GopherQuality:
    """Stage: drop documents failing any Gopher quality rule (reason ``gopher_<rule>``)."""

    name = "gopher_quality"

    def __init__(self, config: GopherQualityConfig | None = None) -> None:
        self.config = config or GopherQualityConfig()
        self._stop_words = frozenset(self.config.stop_words)

    def __call__(self, doc: Document) -> str | None:
        cfg = self.config
        text = doc.text
        words = words_of(text)
        n_words = len(words)
        if n_words < cfg.min_words:
            return "gopher_short_doc"
        if n_words > cfg.max_words:
            return "gopher_long_doc"
        mean_length = sum(map(len, words)) / n_words
        if mean_length < cfg.min_avg_word_length:
            return "gopher_below_avg_word_length"
        if mean_length > cfg.max_avg_word_length:
            return "gopher_above_avg_word_length"
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n_words > cfg.max_symbol_word_ratio:
            return "gopher_symbol_word_ratio"
        lines = lines_of(text)
        if lines:
            if sum(line.startswith(BULLETS) for line in lines) / len(lines) > cfg.max_bullet_lines_ratio:
                return "gopher_bullet_lines"
            if sum(line.endswith(ELLIPSES) for line in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
                return "gopher_ellipsis_lines"
        has_letter = _LETTER.search
        if sum(1 for w in words if has_letter(w)) / n_words < cfg.min_alpha_words_ratio:
            return "gopher_alpha_words"
        if cfg.min_stop_words > 0:
            seen = self._stop_words.intersection({w.lower() for w in set(words)})
            if len(seen) < cfg.min_stop_words:
                return "gopher_stop_words"
        return None


@dataclass
class GopherRepetitionConfig:
    enabled: bool = True
    max_dup_line_fraction: float = 0.3
    max_dup_para_fraction: float = 0.3
    max_dup_line_char_fraction: float = 0.2
    max_dup_para_char_fraction: float = 0.2
    # n -> the most frequent n-gram may cover at most this fraction of the characters
    top_ngram_max_char_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    # n -> n-grams seen before may cover at most this fraction of the characters
    dup_ngram_max_char_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


def duplicate_fractions(elements: list[str]) -> tuple[float, float]:
    """(share of elements equal to an earlier one, share of characters in those repeats)."""
    if not elements:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_count = dup_chars = total_chars = 0
    for element in elements:
        total_chars += len(element)
        if element in seen:
            dup_count += 1
            dup_chars += len(element)
        else:
            seen.add(element)
    return dup_count / len(elements), dup_chars / max(1, total_chars)


class NgramIndex:
    """A document's words as integer ids and lengths, to measure n-gram repetition with numpy.

    Each n-gram becomes one 64-bit number (a polynomial over the word ids; collisions
    would need two different n-grams out of a few thousand to meet in 2**64 values), so
    counting and finding repeats is sorting numbers instead of hashing tuples.
    """

    _MUL = np.uint64(1_000_003)

    def __init__(self, words: list[str]) -> None:
        vocabulary: dict[str, int] = {}
        self.ids = np.array([vocabulary.setdefault(w, len(vocabulary)) for w in words], dtype=np.uint64)
        self.lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.total_chars = int(self.lengths.sum())

    def grams(self, n: int) -> np.ndarray:
        count = len(self.ids) - n + 1
        keys = np.zeros(max(count, 0), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                keys = keys * self._MUL + self.ids[k:k + count] + np.uint64(1)
        return keys

    def top_ngram_char_fraction(self, n: int) -> float:
        """Characters in all occurrences of the most frequent n-gram, over all word characters.

        An n-gram occurring once is not repetition, so that case is 0. Ties go to the
        n-gram that occurs first.
        """
        if len(self.ids) < n or self.total_chars == 0:
            return 0.0
        _, first, counts = np.unique(self.grams(n), return_index=True, return_counts=True)
        best = counts.max()
        if best < 2:
            return 0.0
        start = int(first[counts == best].min())
        return int(self.lengths[start:start + n].sum()) * int(best) / self.total_chars

    def dup_ngram_char_fraction(self, n: int) -> float:
        """Characters of words inside an n-gram that already occurred earlier, each word counted once."""
        if len(self.ids) < n or self.total_chars == 0:
            return 0.0
        keys = self.grams(n)
        order = np.argsort(keys, kind="stable")
        repeat = np.zeros(len(keys), dtype=bool)
        repeat[order[1:]] = keys[order[1:]] == keys[order[:-1]]  # same n-gram as an earlier position
        starts = np.nonzero(repeat)[0]
        if len(starts) == 0:
            return 0.0
        cover = np.zeros(len(self.ids) + 1, dtype=np.int64)
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + n, -1)
        covered = np.cumsum(cover[:-1]) > 0
        return int(self.lengths[covered].sum()) / self.total_chars


class GopherRepetition:
    """Stage: drop repetitive documents (reason ``gopher_dup_*`` / ``gopher_top_*gram`` / ...)."""

    name = "gopher_repetition"

    def __init__(self, config: GopherRepetitionConfig | None = None) -> None:
        self.config = config or GopherRepetitionConfig()

    def __call__(self, doc: Document) -> str | None:
        cfg = self.config
        text = doc.text
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        para_frac, para_char_frac = duplicate_fractions(paragraphs)
        if para_frac > cfg.max_dup_para_fraction:
            return "gopher_dup_para_fraction"
        if para_char_frac > cfg.max_dup_para_char_fraction:
            return "gopher_dup_para_char_fraction"
        line_frac, line_char_frac = duplicate_fractions(lines_of(text))
        if line_frac > cfg.max_dup_line_fraction:
            return "gopher_dup_line_fraction"
        if line_char_frac > cfg.max_dup_line_char_fraction:
            return "gopher_dup_line_char_fraction"
        index = NgramIndex(words_of(text))
        for n, limit in sorted(cfg.top_ngram_max_char_fraction.items()):
            if index.top_ngram_char_fraction(int(n)) > limit:
                return f"gopher_top_{n}gram"
        for n, limit in sorted(cfg.dup_ngram_max_char_fraction.items()):
            if index.dup_ngram_char_fraction(int(n)) > limit:
                return f"gopher_dup_{n}gram"
        return None
