"""The documents a user points `lmforge rag index` at, read by the same readers as `lmforge prepare`.

HTML pages (files or WARC responses) go through the same trafilatura extraction as the
data pipeline, asked for Markdown so that their headings survive as ``#`` lines for
chunking by structure. reST sources are read raw (`prepare` strips their markup on
reading, which also drops the heading underlines); the chunker removes the markup per
chunk. Everything that cannot be read is counted by reason, as in `prepare`'s report.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from lmforge.data.document import Document, StageStats
from lmforge.data.extract import ExtractConfig, Extractor
from lmforge.data.readers import discover_inputs, read_input, read_text_file, sniff_format

MARKDOWN_SUFFIXES = (".md", ".markdown")


@dataclass(frozen=True)
class SourceDocument:
    """A document to index: its key (stable across runs), where it came from, its text and markup."""

    key: str
    source: str  # the file as named on the command line, or the page's URL
    text: str
    markup: str  # "markdown", "rst" or "text" (lmforge.rag.chunk.MARKUPS)
    title: str | None = None


def read_sources(paths: Sequence[str | os.PathLike[str]], stats: StageStats | None = None,
                 *, exclude: str | os.PathLike[str] | None = None) -> Iterator[SourceDocument]:
    """Every document under `paths` (files and folders), in a stable order; unreadable ones counted."""
    stats = stats if stats is not None else StageStats("read")
    extractor = Extractor(ExtractConfig(output_format="markdown"))
    for item in discover_inputs(paths, exclude=exclude):
        fmt = item.format if item.format != "auto" else sniff_format(item.path)
        rst = fmt == "rst"
        docs = read_text_file(item, stats) if rst else read_input(item, stats)
        for doc in docs:
            markup = "rst" if rst else _markup(doc, item.name)
            if doc.metadata.get("content_type") == "html":
                reason = extractor(doc)
                if reason is not None:
                    stats.kept -= 1
                    stats.dropped[reason] += 1
                    continue
            if not doc.text.strip():
                stats.kept -= 1
                stats.dropped["empty"] += 1
                continue
            # a file is its name; a row or a WARC record is named inside its file, so ids from two
            # files cannot collide
            key = doc.id if doc.id.startswith(item.name) else f"{item.name}#{doc.id}"
            yield SourceDocument(key, doc.url or key, doc.text, markup, _title(doc))


def _markup(doc: Document, name: str) -> str:
    if doc.metadata.get("content_type") == "html" or name.lower().endswith(MARKDOWN_SUFFIXES):
        return "markdown"
    return "text"


def _title(doc: Document) -> str | None:
    title = doc.metadata.get("title")
    return str(title) if isinstance(title, str) and title.strip() else None
