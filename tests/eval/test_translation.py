"""Translation: the handbook's paragraph alignment (real counts, and the rules on small pages) and
the BLEU/chrF wiring against sacrebleu's own functions."""

from __future__ import annotations

import pytest
from tests.align.conftest import byte_tokenizer, tiny_llama

from lmforge.eval.lm import EvalModel
from lmforge.eval.translation import TranslationDe, aligned_pairs, corpus_scores, page_paragraphs


def _page(folder, name, paragraphs):
    folder.mkdir(parents=True, exist_ok=True)
    body = "".join(f'<div class="para">\n  {p}\n</div>' for p in paragraphs)
    page = f"<html><body><div class='section'>{body}<p>not a para</p></div></body></html>"
    (folder / name).write_text(page, encoding="utf-8")


@pytest.fixture
def small_handbook(tmp_path):
    command = "apt-get install foo"
    _page(tmp_path / "en-US", "a.html", ["The <em>package</em> is installed.", command, "Goodbye."])
    _page(tmp_path / "de-DE", "a.html", ["Das <em>Paket</em> ist installiert.", command, "Tschüss."])
    _page(tmp_path / "en-US", "b.html", ["One.", "Two."])
    _page(tmp_path / "de-DE", "b.html", ["Eins."])  # counts differ: the page cannot be aligned
    _page(tmp_path / "en-US", "c.html", ["Only English."])  # no German page
    return tmp_path


def test_alignment_rules(small_handbook):
    assert page_paragraphs(small_handbook / "en-US" / "a.html") == [
        "The package is installed.", "apt-get install foo", "Goodbye."]
    pairs = aligned_pairs(small_handbook, "de")
    assert [(p.id, p.source, p.target) for p in pairs] == [
        ("a.html#0", "The package is installed.", "Das Paket ist installiert."),
        ("a.html#2", "Goodbye.", "Tschüss.")]  # the untranslated command is dropped
    with pytest.raises(ValueError, match="unknown target language"):
        aligned_pairs(small_handbook, "xx")
    with pytest.raises(ValueError, match="no English/Spanish"):
        aligned_pairs(small_handbook, "es")


@pytest.mark.parametrize("lang, survey", [("de", 2349), ("es", 2330)])
def test_the_handbook_gives_the_pairs_data_md_counts(handbook, lang, survey):
    pairs = aligned_pairs(handbook, lang)
    assert abs(len(pairs) - survey) / survey < 0.03  # DATA.md's survey; 2,401 and 2,380 here
    assert all(p.source != p.target and p.source and p.target for p in pairs)
    assert len({p.id for p in pairs}) == len(pairs)


def test_scores_are_sacrebleus():
    sacrebleu = pytest.importorskip("sacrebleu")
    references = ["Das Paket ist installiert.", "Der Dienst startet neu.", "Die Datei fehlt."]
    hypotheses = ["Das Paket wurde installiert.", "Der Dienst startet neu.", "Eine Datei fehlt hier."]
    scores = corpus_scores(hypotheses, references)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
    assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert "nc:6|nw:0" in scores["chrf_signature"]
    perfect = corpus_scores(references, references)
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)


def test_the_task_end_to_end_on_a_tiny_model(small_handbook):
    pytest.importorskip("sacrebleu")
    model = EvalModel(tiny_llama(seed=4), byte_tokenizer(), stop_ids=[258])
    result = TranslationDe([small_handbook], max_gen_toks=8).run(model, seed=0)
    assert result.task == "translation_de" and result.metrics["pairs"] == 2
    hypotheses = [r["hypothesis"] for r in result.records]
    assert result.metrics["bleu"] == pytest.approx(corpus_scores(hypotheses, [r["reference"] for r in
                                                                             result.records])["bleu"])
    assert result.info["direction"] == "en->de" and "tok:13a" in result.info["bleu_signature"]
