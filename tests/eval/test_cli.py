"""`lmforge eval` and `lmforge eval compare` end to end on a tiny model."""

import json

from lmforge.cli import main
from lmforge.eval.mmlu import read_questions, write_questions


def test_eval_writes_results_and_compare_tabulates_and_plots(tiny_hf, mmlu_file, tmp_path, capsys):
    rows, _ = read_questions(mmlu_file)
    data = write_questions([q for q in rows if q.subject == "virology"][:8], tmp_path / "mine.jsonl")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    assert main(["eval", "--model", str(tiny_hf), "--task", "mmlu", "--data", str(data), "--limit", "6",
                 "--json", "-q", "-o", str(tmp_path / "a")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mmlu"]["questions"] == 6 and 0 <= printed["mmlu"]["accuracy"] <= 1
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert len(saved["tasks"]["mmlu"]["records"]) == 6
    assert "| virology |" in (tmp_path / "a" / "results.md").read_text()
    assert main(["eval", "--model", str(tiny_hf), "--task", "perplexity", "--data", str(text), "-q",
                 "-o", str(tmp_path / "b")]) == 0
    assert "bits_per_byte" in capsys.readouterr().out
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert main(["eval", "compare", *runs, "-o", str(tmp_path / "p.png")]) == 0
    table = capsys.readouterr().out
    assert "mmlu/accuracy" in table and "perplexity/bits_per_byte" in table
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_line(tiny_hf, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_hf), "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "compare", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
