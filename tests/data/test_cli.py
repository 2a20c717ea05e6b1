"""`lmforge prepare` and `lmforge data samples` through their argparse registration."""

from __future__ import annotations

import argparse
import json

import pytest

from lmforge.data.cli import register


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmforge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_prepare_prints_progress_and_a_summary(handbook, handbook_pages, tmp_path, capsys):
    pages = [str(handbook / "en-US" / p) for p in handbook_pages[:3]]
    code = run(["prepare", *pages, "--output", str(tmp_path / "out"), "--config", "configs/data/fineweb.yaml",
                "--set", "c4.enabled=false", "--set", "shards=2", "--format", "jsonl"])
    captured = capsys.readouterr()
    assert code == 0
    assert "[filter] shard 1/2" in captured.err and "docs/s" in captured.err and "MB/s" in captured.err
    assert "[finish] done" in captured.err
    assert "stage" in captured.out and "gopher_quality" in captured.out and " c4 " not in captured.out
    written = sorted(p.name for p in (tmp_path / "out").glob("part-*"))
    assert written == ["part-00000.jsonl", "part-00001.jsonl"]


def test_prepare_json_report_and_resume(handbook, handbook_pages, tmp_path, capsys):
    page = handbook / "en-US" / handbook_pages[0]
    argv = ["prepare", str(page), "-o", str(tmp_path / "out"), "--json", "-q"]
    assert run(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert run(argv) == 0  # a finished run: nothing to redo, same report numbers
    second = json.loads(capsys.readouterr().out)
    assert second["docs_written"] == first["docs_written"] == 1
    assert second["shards_resumed"] == 1
    assert capsys.readouterr().err == ""


def test_output_inside_the_input_is_not_read_back(handbook, handbook_pages, tmp_path, capsys):
    for page in handbook_pages[:2]:
        (tmp_path / page).write_bytes((handbook / "en-US" / page).read_bytes())
    argv = ["prepare", str(tmp_path), "-o", str(tmp_path / "out"), "--json", "-q", "--format", "jsonl"]
    assert run(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert run(argv) == 0  # the second run must not see out/*.jsonl as new input
    assert json.loads(capsys.readouterr().out)["input_files"] == first["input_files"] == 2


def test_bad_arguments_are_user_errors(tmp_path):
    from lmforge.config import ConfigKeyError

    with pytest.raises(ConfigKeyError, match="gopher_quality.min_wrods"):
        run(["prepare", str(tmp_path), "-o", str(tmp_path / "o"), "--set", "gopher_quality.min_wrods=3"])
    with pytest.raises(ValueError, match="does not exist"):
        run(["prepare", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="workers"):
        run(["prepare", str(tmp_path), "-o", str(tmp_path / "o"), "--workers", "0"])
