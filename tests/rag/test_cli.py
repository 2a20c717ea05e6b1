"""`lmforge rag index|search|eval` as a user runs them: summaries, --json, updates, one-line errors."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main

PAGES = {
    "guide.md": "# Garden\n\nTomatoes need full sun and deep watering twice a week.\n\n"
                "## Pests\n\nAphids gather under the leaves; a jet of water removes them.\n",
    "cars.rst": "Engines\n=======\n\nA diesel engine ignites its fuel by compression alone.\n",
    "page.html": "<html><body><article><h1>Astronomy</h1><p>Jupiter is the largest planet of the solar "
                 "system, a gas giant with dozens of moons.</p><p>Saturn's rings are made of ice.</p>"
                 "</article></body></html>",
    "rows.jsonl": json.dumps({"id": "r1", "text": "Bread rises because yeast ferments the sugars in dough."})
    + "\n",
}


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in PAGES.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def run_json(capsys, argv):
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_index_search_and_update_bm25_only(docs, tmp_path, capsys):
    index = str(tmp_path / "index")
    report = run_json(capsys, ["rag", "index", str(docs), "-o", index, "--embedder", "none", "--json", "-q"])
    assert (report["documents_added"], report["chunks"], report["kind"]) == (4, 5, "none")

    hits = run_json(capsys, ["rag", "search", "--index", index, "aphids leaves", "--mode", "bm25", "--json"])
    assert hits[0]["source"] == "docs/guide.md" and hits[0]["headings"] == ["Garden", "Pests"]
    hits = run_json(capsys, ["rag", "search", "--index", index, "yeast", "--json"])  # BM25-only: bm25
    assert hits[0]["source"] == "docs/rows.jsonl#r1"
    hits = run_json(capsys, ["rag", "search", "--index", index, "jupiter moons", "--mode", "bm25", "--json"])
    assert hits[0]["headings"] == ["Astronomy"]  # the HTML's <h1>, through extraction as Markdown

    (docs / "cars.rst").unlink()
    (docs / "guide.md").write_text(PAGES["guide.md"] + "\n## Harvest\n\nPick them red.\n", encoding="utf-8")
    report = run_json(capsys, ["rag", "index", str(docs), "-o", index, "--embedder", "none", "--json", "-q"])
    assert (report["documents_added"], report["documents_changed"], report["documents_removed"],
            report["documents_kept"]) == (0, 1, 1, 2)
    assert main(["rag", "index", str(docs), "-o", index, "--embedder", "none", "-q"]) == 0
    assert "nothing changed" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["rag", "search", "--index", "{tmp}/missing", "x"], "not a RAG index"),
    (["rag", "index", "{tmp}/empty", "-o", "{tmp}/i", "--embedder", "none"], "no readable input"),
    (["rag", "index", "{tmp}/nothing-here", "-o", "{tmp}/i"], "does not exist"),
    (["rag", "index", "{docs}", "-o", "{tmp}/i", "--chunk-tokens", "1000"], "more than"),
    (["rag", "index", "{docs}", "-o", "{tmp}/i", "--overlap", "300"], "--overlap"),
    (["rag", "eval", "--task", "doc2dial", "--index", "{tmp}/bm25", "--mode", "bm25"], "does not hold"),
    (["rag", "search", "--index", "{tmp}/bm25", "x", "--mode", "dense"], "no dense vectors"),
])
def test_bad_input_is_one_clear_line(argv, message, docs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["rag", "index", str(docs), "-o", str(tmp_path / "bm25"), "--embedder", "none", "-q"]) == 0
    capsys.readouterr()
    argv = [a.format(tmp=tmp_path, docs=docs) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("lmforge rag: error:") and "Traceback" not in err


def test_eval_doc2dial_bm25_builds_its_corpus_index(capsys):
    result = run_json(capsys, ["rag", "eval", "--task", "doc2dial", "--embedder", "none", "--mode", "bm25",
                               "--limit", "400", "--json", "-q"])
    assert result["queries"] == 400 and result["corpus"] == 1239
    assert 0.3 < result["metrics"]["recall@5"] < 1.0  # BM25 over a site's chunks: far above chance (~0.015)
    assert result["baseline"]["metrics"]["recall@5"] > result["baseline"]["metrics"]["recall@1"]


@pytest.fixture(scope="module")
def minilm():
    from lmforge.hub import SampleError

    try:
        from lmforge.rag.embed import load_embedder

        return load_embedder("minilm")
    except SampleError as err:
        pytest.skip(f"all-MiniLM-L6-v2 sample unavailable: {err}")


def test_minilm_index_finds_meaning_bm25_cannot(minilm, docs, tmp_path, capsys):
    """The real encoder end to end: a paraphrase that shares no word with its passage."""
    index = str(tmp_path / "index")
    report = run_json(capsys, ["rag", "index", str(docs), "-o", index, "--json", "-q"])
    assert report["chunks"] == 5
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["embedder"] == {"name": minilm.name, "dim": 384}
    query = "biggest world circling our star"
    assert run_json(capsys, ["rag", "search", "--index", index, query, "--mode", "bm25", "--json"]) == []
    hits = run_json(capsys, ["rag", "search", "--index", index, query, "--mode", "dense", "-k", "2",
                             "--json"])
    assert "Jupiter" in hits[0]["text"] and hits[0]["score"] > hits[1]["score"]
    assert main(["rag", "index", str(docs), "-o", index, "--embedder", "none"]) == 2
    assert "was built with embedder" in capsys.readouterr().err
