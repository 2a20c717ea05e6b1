"""`lmforge eval` and `lmforge eval compare` end to end on a tiny model."""

import json

import pytest

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


def test_task_options_reach_the_task_typed_and_checked(tmp_path):
    from lmforge.eval.cli import task_option_values
    from lmforge.eval.tasks import make_task

    options = task_option_values(["hotpotqa.distractors=true", "max_gen_toks=8"], ["hotpotqa", "squad"])
    assert options == {"hotpotqa": {"distractors": True, "max_gen_toks": 8}, "squad": {"max_gen_toks": 8}}
    task = make_task("hotpotqa", **options["hotpotqa"])
    assert task.distractors is True and task.max_gen_toks == 8
    assert make_task("mmath", lang="de", ks=[1, 4]).lang == "de"
    with pytest.raises(ValueError, match="has no option 'beam'; its options: distractors, max_gen_toks"):
        make_task("hotpotqa", beam=4)
    with pytest.raises(ValueError, match="option distractors takes bool, not 'maybe'"):
        make_task("hotpotqa", distractors="maybe")
    with pytest.raises(ValueError, match="option samples takes int, not 2.5"):
        make_task("mmath", samples=2.5)
    with pytest.raises(ValueError, match="not among the tasks asked for"):
        task_option_values(["mmlu.shots=1"], ["hotpotqa"])


def test_a_bad_option_is_a_one_line_error_before_the_model_loads(capsys):
    assert main(["eval", "--model", "no-such-model", "--task", "hotpotqa", "--option", "beam=4"]) == 2
    err = capsys.readouterr().err
    assert "has no option 'beam'" in err and "Traceback" not in err
