"""Language ID on the multilingual Debian handbook: an English-only run keeps only English."""

from __future__ import annotations

from lmforge.data.document import Document
from lmforge.data.filters import LanguageConfig, LanguageFilter, LanguageIdentifier
from lmforge.data.pipeline import prepare
from lmforge.data.writers import read_documents

from .conftest import copy_into, only

LANGUAGES = {"en-US": "en", "fr-FR": "fr", "de-DE": "de", "ja-JP": "ja"}


def test_english_only_run_keeps_only_english(handbook, handbook_pages, tmp_path):
    corpus = copy_into(tmp_path / "in", [(handbook / folder / page, f"{folder}/{page}")
                                         for folder in LANGUAGES for page in handbook_pages])
    report = prepare([corpus], tmp_path / "out", only("extract", "language"))
    docs = [d for path in sorted((tmp_path / "out").glob("part-*.parquet")) for d in read_documents(path)]
    folder_of = {d.id: d.id.split("/")[1] for d in docs}

    # Every English chapter survives, with FineWeb's metadata columns filled in.
    assert sorted(d.id.split("/")[-1] for d in docs if folder_of[d.id] == "en-US") == sorted(handbook_pages)
    assert all(d.metadata["language"] == "en" and d.metadata["language_score"] >= 0.65 for d in docs)

    # Translations go, each counted under its language. The handbook leaves a few
    # chapters (partly) untranslated: those that survive must read as English to a
    # second, independent model too.
    stats = next(s for s in report.stages if s.name == "language")
    for code in ("fr", "de", "ja"):
        assert stats.dropped[f"language_{code}"] >= len(handbook_pages) // 2, stats.dropped
    second_opinion = LanguageIdentifier("py3langid")
    for d in docs:
        if folder_of[d.id] != "en-US":
            assert second_opinion.identify(d.text)[0] == "en", d.id
    assert len(docs) < 1.5 * len(handbook_pages)


def test_languages_and_threshold_are_settings():
    text = ("Le comité s'est réuni mardi pour discuter du budget de l'année prochaine. Les membres ont "
            "convenu que la bibliothèque devrait ouvrir plus longtemps.")
    french = Document("fr", text)
    assert LanguageFilter(LanguageConfig(languages=["en"]))(french) == "language_fr"
    assert LanguageFilter(LanguageConfig(languages=["en", "fr"]))(Document("fr", text)) is None
    picky = LanguageFilter(LanguageConfig(languages=[], min_score=1.01))
    assert picky(Document("fr", text)) == "language_low_score"
    kept = Document("fr", text)
    assert LanguageFilter(LanguageConfig(languages=["fr"], backend="py3langid"))(kept) is None
    assert kept.metadata["language"] == "fr" and 0.65 <= kept.metadata["language_score"] <= 1.0
