"""Chunking: token windows with overlap, sections at headings, offsets back into the text, real docs."""

from __future__ import annotations

import pytest

from lmforge.rag.chunk import ChunkConfig, TokenCounter, chunk_text, sections, token_windows
from lmforge.rag.sources import read_sources


def one_token_a_word(text: str) -> int:
    return len(text.split())


def test_token_windows_respect_the_budget_and_overlap():
    words = [(i * 3, i * 3 + 2, 1) for i in range(25)]  # 25 one-token words
    spans = token_windows(words, max_tokens=10, overlap=3)
    starts = [words.index(next(w for w in words if w[0] == s)) for s, _ in spans]
    ends = [words.index(next(w for w in words if w[1] == e)) for _, e in spans]
    assert starts == [0, 7, 14, 21] and ends == [9, 16, 23, 24]  # each window re-reads the last 3 words


def test_token_windows_weigh_words_by_their_tokens():
    words = [(0, 1, 4), (2, 3, 4), (4, 5, 4), (6, 7, 4)]
    assert token_windows(words, max_tokens=8, overlap=4) == [(0, 3), (2, 5), (4, 7)]
    assert token_windows([(0, 1, 50)], max_tokens=8, overlap=2) == [(0, 1)]  # one oversize word: alone


def test_token_chunks_cover_the_text_in_order():
    text = " ".join(f"w{i}" for i in range(103))
    chunks = chunk_text(text, one_token_a_word, ChunkConfig("tokens", max_tokens=20, overlap=5),
                        source="f.txt", doc_id="f.txt")
    assert all(one_token_a_word(c.text) <= 20 for c in chunks)
    assert all(text[c.start:c.end] == c.text for c in chunks)
    assert [c.number for c in chunks] == list(range(len(chunks)))
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for a, b in zip(chunks, chunks[1:]):
        shared = set(a.text.split()) & set(b.text.split())
        assert len(shared) == 5  # the overlap, in tokens


MARKDOWN = """Preface paragraph.

# Install

Get the package.

## On Windows

Run the installer.

```
# a comment in code, not a heading
```

Usage
=====

Call it.
"""


def test_markdown_sections_carry_their_heading_path():
    found = [(s.headings, [MARKDOWN[a:b] for a, b in s.blocks]) for s in sections(MARKDOWN, "markdown")]
    assert found == [((), ["Preface paragraph."]),
                     (("Install",), ["Get the package."]),
                     (("Install", "On Windows"), ["Run the installer.",
                                                  "```\n# a comment in code, not a heading\n```"]),
                     (("Usage",), ["Call it."])]


RST = """=======
Library
=======

Intro with :func:`open` and ``code``.

Files
-----

About files.

Paths
~~~~~

About paths.

Sockets
-------

About sockets.
"""


def test_rst_levels_follow_the_order_styles_appear_in():
    chunks = chunk_text(RST, one_token_a_word, ChunkConfig("structure", 50, 5), markup="rst")
    assert [(c.headings, c.text) for c in chunks] == [
        (("Library",), "Intro with open and code."),  # markup removed from the chunk
        (("Library", "Files"), "About files."),
        (("Library", "Files", "Paths"), "About paths."),
        (("Library", "Sockets"), "About sockets.")]
    # offsets point into the source
    assert RST[chunks[0].start:chunks[0].end] == "Intro with :func:`open` and ``code``."


def test_a_rule_under_a_sentence_is_not_a_heading():
    text = "A long sentence that goes on.\n---\n\nNext paragraph.\n"
    assert [s.headings for s in sections(text, "markdown")] == [()]


def test_structure_packs_paragraphs_and_cuts_long_ones():
    paragraphs = [" ".join(f"p{p}w{i}" for i in range(n)) for p, n in enumerate([4, 5, 30, 3])]
    text = "\n\n".join(paragraphs)
    chunks = chunk_text(text, one_token_a_word, ChunkConfig("structure", max_tokens=12, overlap=2))
    assert chunks[0].text == paragraphs[0] + "\n\n" + paragraphs[1]  # 4 + 5 tokens packed together
    assert all(one_token_a_word(c.text) <= 12 for c in chunks)
    long_pieces = [c for c in chunks if "p2w" in c.text]
    assert len(long_pieces) == 3 and long_pieces[0].text.startswith("p2w0")  # 30 tokens, windows of 12
    assert chunks[-1].text.endswith(paragraphs[3])
    assert all(text[c.start:c.end] == c.text for c in chunks)


def test_none_mode_keeps_a_document_whole_with_its_title():
    chunks = chunk_text("  Ed Wood is a 1994 film.  ", one_token_a_word, ChunkConfig("none"), title="Ed Wood")
    assert len(chunks) == 1 and chunks[0].text == "Ed Wood is a 1994 film."
    assert chunks[0].indexed_text == "Ed Wood\nEd Wood is a 1994 film."


def test_token_counter_counts_each_distinct_word_once():
    calls = []
    counter = TokenCounter(lambda w: calls.append(w) or len(w))
    assert counter("ab ab abc") == 7
    assert calls == ["ab", "abc"]


@pytest.mark.parametrize("config", [dict(mode="lines"), dict(max_tokens=4), dict(max_tokens=20, overlap=20)])
def test_bad_settings_are_named(config):
    with pytest.raises(ValueError, match="chunking|chunk-tokens|overlap"):
        ChunkConfig(**config)


def test_real_docs_html_and_rst_through_the_prepare_readers(python_docs):
    """Python's tutorial as HTML (extracted as Markdown) and as its reST source: both keep headings."""
    docs = list(read_sources([python_docs / "tutorial" / "controlflow.html",
                              python_docs / "_sources" / "tutorial" / "controlflow.rst.txt"]))
    assert sorted(d.markup for d in docs) == ["markdown", "rst"]
    for doc in docs:
        chunks = chunk_text(doc.text, one_token_a_word, ChunkConfig("structure", 120, 20), source=doc.source,
                            doc_id=doc.key, markup=doc.markup)
        paths = {c.headings for c in chunks}
        assert any(len(p) >= 2 and "if Statements" in p[1] for p in paths), sorted(paths)[:5]
        assert all(one_token_a_word(c.text) <= 120 for c in chunks)
        assert all(c.source == doc.source for c in chunks)
