"""`lmforge tokenize` always leaves something to train on, and says when the split is not what
was asked; the shards carry their tokenizer."""

from __future__ import annotations

import json

from lmforge.cli import main
from lmforge.data.shards import TOKENIZER_FOLDER, is_validation, load_shard_set
from lmforge.tokenizer import load_tokenizer

TEXT = "A long chapter about pelicans and the sea. " * 400


def _tokenize(capsys, folder, out, fraction: str) -> dict:
    capsys.readouterr()
    code = main(["tokenize", str(folder), "-t", "smollm2", "-o", str(out), "--val-fraction", fraction,
                 "--json", "-q"])
    assert code == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_a_single_long_text_trains_and_says_why_there_is_no_validation(tmp_path, capsys, smollm2_gguf):
    folder = tmp_path / "book"
    folder.mkdir()
    (folder / "chapter.txt").write_text(TEXT)
    report = _tokenize(capsys, folder, tmp_path / "shards", "0.99")
    assert report["splits"]["train"]["documents"] == 1 and report["splits"]["val"]["documents"] == 0
    assert "the only document fell in the validation split" in report["notes"][0]
    meta, shards = load_shard_set(tmp_path / "shards", "train")
    assert sum(len(s) for s in shards) == report["splits"]["train"]["tokens"] > 1000


def test_when_every_document_is_held_out_the_first_trains(tmp_path, capsys, smollm2_gguf):
    folder = tmp_path / "book"
    folder.mkdir()
    names = [n for n in (f"c{i}.txt" for i in range(40)) if is_validation(str(folder / n), 0.9)][:3]
    for name in names:
        (folder / name).write_text(TEXT)
    report = _tokenize(capsys, folder, tmp_path / "shards", "0.9")
    assert report["splits"]["train"]["documents"] == 1 and report["splits"]["val"]["documents"] == 2
    assert "every document fell in the validation split" in report["notes"][0]


def test_shards_carry_their_tokenizer(tmp_path, capsys, smollm2_gguf):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    _tokenize(capsys, folder, tmp_path / "shards", "0.0")
    copy = load_tokenizer(tmp_path / "shards" / TOKENIZER_FOLDER)
    assert copy.encode(TEXT[:200]) == load_tokenizer("smollm2").encode(TEXT[:200])
