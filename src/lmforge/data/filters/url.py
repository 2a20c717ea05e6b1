"""URL filter: drop pages from blocked domains or with blocked words in their address.

FineWeb's first filter, applied before any HTML is parsed (it is the cheapest one):
a domain blocklist (FineWeb uses the ~4.6M adult domains of the Toulouse UT1 list),
plus words in the URL. Because a word list cannot know that ``pornhub`` contains
``porn``, FineWeb also checks the URL's letters run together for a few unambiguous
words, and counts milder words only when two or more occur. An allowlist overrides
everything, for the rare legitimate site caught by a word.

The built-in lists are deliberately short; load a real blocklist with
``blocklist_files`` (one domain per line, ``#`` comments allowed). Documents without
a URL (local files) pass untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from lmforge.data.document import Document
from lmforge.data.errors import DataInputError

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


@dataclass
class UrlFilterConfig:
    enabled: bool = True
    blocked_domains: list[str] = field(default_factory=list)
    blocklist_files: list[str] = field(default_factory=list)
    allowed_domains: list[str] = field(default_factory=list)
    # one of these as a token of the URL drops the page
    blocked_words: list[str] = field(default_factory=lambda: [
        "porn", "porno", "xxx", "hentai", "nsfw", "camgirl", "camgirls", "livesex", "sexcam", "milf"])
    # these need `soft_min_hits` occurrences among the URL's tokens
    soft_blocked_words: list[str] = field(default_factory=lambda: [
        "sex", "adult", "nude", "naked", "escort", "erotic", "fetish", "strip", "hot", "gay", "teen"])
    soft_min_hits: int = 2
    # substrings searched in the URL with separators removed ("freepornsite" -> "porn")
    blocked_substrings: list[str] = field(default_factory=lambda: ["porn", "xxx", "hentai"])


def _domains_of(host: str) -> list[str]:
    """``a.b.example.com`` -> [``a.b.example.com``, ``b.example.com``, ``example.com``, ``com``]."""
    parts = host.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def load_domain_list(path: str) -> set[str]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise DataInputError(f"url_filter.blocklist_files: cannot read {path}: {err.strerror}") from err
    return {line.strip().lower().lstrip(".") for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")}


class UrlFilter:
    """Stage: reasons ``url_blocked_domain``, ``url_blocked_word``, ``url_soft_words``,
    ``url_blocked_substring``."""

    name = "url_filter"

    def __init__(self, config: UrlFilterConfig | None = None) -> None:
        self.config = config or UrlFilterConfig()
        cfg = self.config
        self._blocked = {d.lower().lstrip(".") for d in cfg.blocked_domains}
        for path in cfg.blocklist_files:
            self._blocked |= load_domain_list(path)
        self._allowed = {d.lower().lstrip(".") for d in cfg.allowed_domains}
        self._words = frozenset(w.lower() for w in cfg.blocked_words)
        self._soft = frozenset(w.lower() for w in cfg.soft_blocked_words)
        self._substrings = tuple(s.lower() for s in cfg.blocked_substrings)

    def __call__(self, doc: Document) -> str | None:
        if not doc.url:
            return None
        url = doc.url.lower()
        host = (urlsplit(url).hostname or "").rstrip(".")
        domains = _domains_of(host) if host else []
        if any(d in self._allowed for d in domains):
            return None
        if any(d in self._blocked for d in domains):
            return "url_blocked_domain"
        tokens = [t for t in _NON_ALNUM.split(url) if t]
        if any(t in self._words for t in tokens):
            return "url_blocked_word"
        if sum(t in self._soft for t in tokens) >= self.config.soft_min_hits:
            return "url_soft_words"
        joined = "".join(tokens)
        if any(s in joined for s in self._substrings):
            return "url_blocked_substring"
        return None
