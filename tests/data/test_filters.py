"""Quality filters: each rule on text built to trip it, and on real pages end to end."""

from __future__ import annotations

import json

import pytest

from lmforge.data.document import Document, StageStats, run_stages
from lmforge.data.extract import Extractor, tidy_text
from lmforge.data.filters import (
    C4Config,
    C4Filter,
    FineWebFilter,
    GopherQuality,
    GopherRepetition,
    UrlFilter,
    UrlFilterConfig,
)
from lmforge.data.filters.gopher import NgramIndex
from lmforge.data.filters.words import count_sentences, words_of
from lmforge.data.pipeline import prepare

from .conftest import copy_into, only

PROSE = ("The committee met on Tuesday to discuss the budget for the coming year. Members agreed that the "
         "library should have longer opening hours, and that the park needs new benches. The treasurer "
         "warned that costs had risen with inflation. After a long debate, they voted to raise the fee for "
         "parking by a small amount. The mayor thanked everyone for their work and closed the meeting.")


def doc(text: str, url: str | None = None) -> Document:
    return Document("t", text, url=url)


def test_prose_passes_every_filter():
    for stage in (GopherRepetition(), GopherQuality(), C4Filter(), FineWebFilter()):
        assert stage(doc(PROSE)) is None, stage.name


@pytest.mark.parametrize("text,reason", [
    ("Too short to be an article.", "gopher_short_doc"),
    (" ".join(["a1 b2 c3 d4"] * 40), "gopher_below_avg_word_length"),
    (" ".join(["internationalization"] * 60) + " the and", "gopher_above_avg_word_length"),
    (PROSE + " #tag" * 20, "gopher_symbol_word_ratio"),
    ("\n".join(f"- item number {i} of the list and the rest" for i in range(20)), "gopher_bullet_lines"),
    ("\n".join(f"Read the full story about topic {i} and what the council said about it in the end..."
               for i in range(20)), "gopher_ellipsis_lines"),
    (" ".join(f"{i * 1000 + 123} {i * 777 + 4567} value" for i in range(30)) + " the and of",
     "gopher_alpha_words"),
    (" ".join(["apple banana cherry orange melon lemon"] * 15), "gopher_stop_words"),
])
def test_gopher_quality_rules(text, reason):
    assert GopherQuality()(doc(text)) == reason


def test_gopher_repetition_rules():
    repeated_lines = "\n".join(["Buy cheap watches online now."] * 5 + ["A different line here."] * 2)
    assert GopherRepetition()(doc(repeated_lines)) == "gopher_dup_para_fraction" or \
        GopherRepetition()(doc(repeated_lines)).startswith("gopher_dup_line")
    spam = PROSE + " " + " ".join(["click here"] * 60)
    assert GopherRepetition()(doc(spam)) == "gopher_top_2gram"
    copied = PROSE + " " + PROSE.replace(".", ",")  # same words twice, lines differ
    assert GopherRepetition()(doc(copied)).startswith("gopher_dup_")


def test_ngram_fractions_by_hand():
    index = NgramIndex(["a", "b", "c", "a", "b", "c", "x"])  # 7 words, 7 characters
    assert index.top_ngram_char_fraction(2) == pytest.approx(4 / 7)  # "a b" twice
    assert index.dup_ngram_char_fraction(3) == pytest.approx(3 / 7)  # second "a b c"
    assert NgramIndex(["a", "b", "c", "d"]).top_ngram_char_fraction(2) == 0.0


def test_c4_removes_lines_and_drops_pages():
    page = "\n".join([PROSE, "Menu", "Please enable JavaScript to view the comments.",
                      "This site uses cookies to improve your experience.",
                      "Citation needed here [1] today ok."])
    d = doc(page)
    stage = C4Filter()
    assert stage(d) is None
    assert d.text.splitlines() == [PROSE, "Citation needed here today ok."]
    assert stage.counters == {"lines_too_few_words": 1, "lines_javascript": 1, "lines_policy": 1}
    assert C4Filter()(doc(PROSE + "\nLorem ipsum dolor sit amet.")) == "c4_lorem_ipsum"
    assert C4Filter()(doc(PROSE + "\nfunction f() { return 1; }")) == "c4_curly_bracket"
    assert C4Filter()(doc("One sentence only here.")) == "c4_too_few_sentences"
    strict = C4Filter(C4Config(require_terminal_punct=True))
    d = doc(PROSE + "\nA line without an end mark")
    assert strict(d) is None and d.text == PROSE


def test_fineweb_rules():
    menu = "\n".join(["Home", "About us", "Products and services", "Contact", PROSE])
    assert FineWebFilter()(doc(menu)) == "fineweb_short_lines"
    no_punct = "\n".join([f"Section {i} heading words that go on for a while" for i in range(10)] + [PROSE])
    assert FineWebFilter()(doc(no_punct)) == "fineweb_line_punct_ratio"
    dup = "\n".join([PROSE, "Share this article with your friends today.", PROSE[:200] + ".",
                     "Share this article with your friends today."])
    assert FineWebFilter()(doc(dup)) == "fineweb_char_dup_ratio"
    listy = "\n".join(f"Extraordinarily{i} uncharacteristically." for i in range(30))
    assert FineWebFilter()(doc(listy)) == "fineweb_list_ratio"


def test_url_filter():
    stage = UrlFilter(UrlFilterConfig(blocked_domains=["bad.example"], allowed_domains=["xxx-games.example"]))
    assert stage(doc(PROSE, "https://www.bad.example/page")) == "url_blocked_domain"
    assert stage(doc(PROSE, "https://news.example/free-porn-here")) == "url_blocked_word"
    assert stage(doc(PROSE, "https://news.example/hot-nude-pics")) == "url_soft_words"
    assert stage(doc(PROSE, "https://freepornsite.example/")) == "url_blocked_substring"
    assert stage(doc(PROSE, "https://xxx-games.example/")) is None  # allowlisted
    # one soft word only, and no blocked substring
    assert stage(doc(PROSE, "https://www.sussex.ac.uk/essex-hot-topics")) is None
    assert stage(doc(PROSE)) is None  # no URL: a local file


def test_words_and_sentences():
    assert words_of("(see page 12). “Quoted” — dash") == ["see", "page", "12", "Quoted", "dash"]
    assert count_sentences("One. Two! Three? four") == 4
    assert count_sentences("No end mark") == 1


def test_tidy_text_glues_bullets_and_collapses_space():
    assert tidy_text("- \n\t\t modern,   scalable\n\n  text\u00a0here ") == "- modern, scalable\ntext here"


def test_extract_keeps_the_article_and_drops_navigation(handbook):
    html = (handbook / "en-US" / "case-study.html").read_text(encoding="utf-8")
    d = Document("case-study", html, metadata={"content_type": "html"})
    assert Extractor()(d) is None
    assert "Falcot Corp is a manufacturer of high quality audio equipment" in d.text
    assert "<div" not in d.text and "Prev" not in d.text.split("\n")[0]
    assert d.metadata["content_type"] == "text"
    assert Extractor()(Document("x", "<html><body><script>var x = 1;</script></body></html>",
                                metadata={"content_type": "html"})) == "no_main_text"


def test_error_in_a_stage_drops_the_document_not_the_run():
    class Broken:
        name = "broken"

        def __call__(self, d):
            raise KeyError("boom")

    stats: dict[str, StageStats] = {}
    assert list(run_stages([doc("a"), doc("b")], [Broken()], stats)) == []
    assert stats["broken"].dropped == {"error_KeyError": 2}


def test_boilerplate_pages_are_dropped_with_their_reason(python_docs, handbook, tmp_path):
    """Index, search, contents and legal pages of the Python docs are not prose."""
    boilerplate = ["genindex-A.html", "py-modindex.html", "search.html", "contents.html", "copyright.html"]
    corpus = copy_into(tmp_path / "in", [(python_docs / n, f"py/{n}") for n in boilerplate]
                       + [(handbook / "en-US" / "case-study.html", "hb/case-study.html")])
    config = only("extract", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb",
                  keep_intermediate=True)
    report = prepare([corpus], tmp_path / "out", config)
    assert report.docs_written == 1  # only the handbook chapter
    dropped = {s.name: dict(s.dropped) for s in report.stages if s.dropped}
    reasons = {reason for stage in dropped.values() for reason in stage}
    assert len(reasons) >= 3  # different pages fail different rules, and each says which
    assert sum(sum(d.values()) for d in dropped.values()) == len(boilerplate)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    by_name = {s["name"]: s for s in saved["stages"]}
    assert sum(by_name[n]["dropped"] for n in by_name) == len(boilerplate)
