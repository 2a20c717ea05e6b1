"""HTML to main text with trafilatura: keep the article, drop menus, footers and ads.

A web page is mostly not its content: navigation, cookie banners, sidebars, link
lists. FineWeb found that extracting text with trafilatura from the raw HTML (rather
than using Common Crawl's WET text, which keeps all of that) gave measurably better
models, so this is the first content stage. ``favor_precision`` tells trafilatura to
leave out doubtful blocks: a missing paragraph costs little, boilerplate repeated over
millions of pages costs a lot.

trafilatura's own ``deduplicate`` option is off: it remembers text across calls in a
process-wide cache, which would make a document's output depend on which worker read
which page before it, and break the promise that a resumed run writes the same bytes.
Deduplication is the job of `lmforge.data.dedup`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmforge.data.document import Document

_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_BULLET_ONLY = re.compile(r"^[-*•‣◦·]$")


@dataclass
class ExtractConfig:
    enabled: bool = True
    favor_precision: bool = True  # FineWeb's setting: when unsure, leave a block out
    include_comments: bool = False
    include_tables: bool = True
    output_format: str = "txt"  # "markdown" keeps headings as `#` lines (lmforge.rag chunks by them)
    max_html_mb: float = 5.0  # bigger pages are almost never articles, and slow to parse
    min_chars: int = 1  # drop a page whose extracted text is shorter than this


def tidy_text(text: str) -> str:
    """Collapse runs of spaces, strip lines, drop blank ones, glue a lone bullet to its item.

    trafilatura keeps the source's indentation inside list items, which would make
    ``"-"`` a line of its own and distort the line-based quality filters.
    """
    lines: list[str] = []
    pending_bullet = ""
    for raw in text.splitlines():
        line = _SPACES.sub(" ", raw).strip()
        if not line:
            continue
        if _BULLET_ONLY.match(line):
            pending_bullet = line + " "
            continue
        lines.append(pending_bullet + line)
        pending_bullet = ""
    return "\n".join(lines)


class Extractor:
    """Stage: replace an HTML document's text with its main text; other documents pass."""

    name = "extract"

    def __init__(self, config: ExtractConfig | None = None) -> None:
        import trafilatura

        self.config = config or ExtractConfig()
        self._extract = trafilatura.extract

    def __call__(self, doc: Document) -> str | None:
        if doc.metadata.get("content_type") != "html":
            return None
        if len(doc.text) > self.config.max_html_mb * 1_000_000:
            return "html_too_large"
        text = self._extract(doc.text, favor_precision=self.config.favor_precision,
                             include_comments=self.config.include_comments,
                             include_tables=self.config.include_tables, deduplicate=False,
                             output_format=self.config.output_format)
        text = tidy_text(text or "")
        if len(text) < max(1, self.config.min_chars):
            return "no_main_text"
        doc.text = text
        doc.metadata["content_type"] = "text"
        return None
