"""The C4 rules (Raffel et al. 2020, "Colossal Clean Crawled Corpus"), as FineWeb applies them.

C4 cleans line by line, then judges the page: lines with fewer than 3 words go (menus,
buttons, headings), as do lines mentioning "javascript" ("please enable JavaScript")
or cookie/terms-of-use phrases, and lines with an absurdly long word. Wikipedia-style
citation marks (``[1]``, ``[edit]``) are removed. A page goes entirely when it says
"lorem ipsum" (a template), contains a curly bracket (code, JSON, templates), or keeps
fewer than 5 sentences.

C4 also kept only lines ending in terminal punctuation. FineWeb found that rule removed
too much good text (about 30% of tokens) and turned it off; so is it here
(``require_terminal_punct: false``), one switch away. The "bad words" page filter is not
applied either: FineWeb dropped it too (it removes medical and LGBTQ pages more than
harmful ones); the URL filter handles adult sites.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from lmforge.data.document import Document
from lmforge.data.filters.words import TERMINAL_PUNCTUATION, count_sentences

CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)


@dataclass
class C4Config:
    enabled: bool = True
    require_terminal_punct: bool = False  # C4: true; FineWeb: false (see module docstring)
    remove_citations: bool = True
    min_sentences: int = 5  # 0 disables
    min_words_per_line: int = 3  # 0 disables
    max_word_length: int = 1000  # 0 disables
    drop_lorem_ipsum: bool = True
    drop_javascript_lines: bool = True
    drop_curly_bracket: bool = True
    drop_policy_lines: bool = True
    policy_phrases: list[str] = field(default_factory=lambda: [
        "terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies"])


class C4Filter:
    """Stage: remove C4's bad lines from the text, then drop pages failing C4's page rules.

    `counters` records how many lines each line rule removed (``lines_<rule>``); the
    pipeline adds them to the stage's report.
    """

    name = "c4"

    def __init__(self, config: C4Config | None = None) -> None:
        self.config = config or C4Config()
        self.counters: Counter[str] = Counter()

    def __call__(self, doc: Document) -> str | None:
        cfg = self.config
        kept: list[str] = []
        sentences = 0
        for raw in doc.text.split("\n"):
            line = raw.strip()
            if not line:
                continue
            words = line.split()
            if cfg.max_word_length and any(len(w) > cfg.max_word_length for w in words):
                self.counters["lines_too_long_word"] += 1
                continue
            if cfg.remove_citations and "[" in line:
                line = " ".join(CITATION.sub("", line).split())
            if cfg.require_terminal_punct and (not line.endswith(TERMINAL_PUNCTUATION)
                                               or line.endswith("...")):
                self.counters["lines_no_terminal_punct"] += 1
                continue
            if len(words) < cfg.min_words_per_line:
                self.counters["lines_too_few_words"] += 1
                continue
            lower = line.lower()
            if cfg.drop_lorem_ipsum and "lorem ipsum" in lower:
                return "c4_lorem_ipsum"
            if cfg.drop_javascript_lines and "javascript" in lower:
                self.counters["lines_javascript"] += 1
                continue
            if cfg.drop_curly_bracket and "{" in line:
                return "c4_curly_bracket"
            if cfg.drop_policy_lines and any(p in lower for p in cfg.policy_phrases):
                self.counters["lines_policy"] += 1
                continue
            if cfg.min_sentences:
                sentences += count_sentences(line)
            kept.append(line)
        if sentences < cfg.min_sentences:
            return "c4_too_few_sentences"
        if not kept:
            return "c4_no_lines_left"
        doc.text = "\n".join(kept)
        return None
