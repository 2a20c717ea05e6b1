"""`lmforge demo` end to end on a few real pages and reST files, with a few training steps."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.demo import DemoConfig, run_demo


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, handbook, python_docs) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("demo-inputs")
    pages, text = root / "pages", root / "text"
    pages.mkdir()
    text.mkdir()
    for page in sorted((handbook / "en-US").glob("*.html"))[:12]:
        (pages / page.name).write_bytes(page.read_bytes())
    for source in sorted((python_docs / "_sources" / "tutorial").glob("*.rst.txt"))[:6]:
        (text / source.name).write_bytes(source.read_bytes())
    return pages, text


def test_every_stage_runs_and_a_rerun_reuses_them(inputs, tmp_path):
    pages, text = inputs
    config = DemoConfig(output=tmp_path / "demo", pages=[str(pages)], text=[str(text)], vocab_size=400,
                        steps=3, prompts=("The interpreter", "Debian"), max_new_tokens=8)
    out = io.StringIO()
    summary = run_demo(config, quiet=True, out=out)
    report = out.getvalue()
    for stage in ("[1/6] prepare web pages", "[3/6] train a tokenizer", "[5/6] pretrain", "[6/6] sample"):
        assert stage in report
    assert 0 < summary["web"]["kept"] <= summary["web"]["read"] == 12
    assert summary["text"]["kept"] > 0
    assert summary["tokenizer"]["vocab_size"] == 400
    assert summary["tokens"]["train"] > 0  # (a dozen documents may leave none for the 2% validation split)
    checkpoint = Path(summary["pretrain"]["checkpoint"])
    assert checkpoint.name == "step-000003" and (checkpoint / "model.safetensors").exists()
    assert Path(summary["pretrain"]["plot"]).exists()
    assert set(summary["samples"]) == {"The interpreter", "Debian"}
    assert all(isinstance(t, str) and t for t in summary["samples"].values())

    again = io.StringIO()
    rerun = run_demo(config, quiet=True, out=again)
    assert "(reused)" in again.getvalue()  # the tokenizer was not retrained
    assert rerun["pretrain"]["checkpoint"] == summary["pretrain"]["checkpoint"]  # resumed at the last step
    assert rerun["samples"] == summary["samples"]  # seeded sampling


def test_cli_json_summary_and_bad_steps(inputs, tmp_path, capsys):
    pages, text = inputs
    args = ["demo", "-o", str(tmp_path / "d"), "--pages", str(pages), "--text", str(text), "--no-serve"]
    assert main([*args, "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    code = main([*args, "--steps", "1", "--vocab-size", "300", "--quiet", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokenizer"]["vocab_size"] == 300 and summary["pretrain"]["parameters"] > 0
