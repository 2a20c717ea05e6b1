"""Hostile tokenizer.json files: one `TokenizerError` naming the file and the fault, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.tokenizer import Tokenizer, train
from lmforge.tokenizer.errors import TokenizerError
from lmforge.tokenizer.hf_json import read_tokenizer_json

TEXT = "the quick brown fox jumps over the lazy dog, again and again; " * 40


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model = train.train_bpe([TEXT], 300, pattern=train.GPT2_PATTERN, special_tokens=["<|endoftext|>"])
    folder = tmp_path_factory.mktemp("tok")
    Tokenizer.from_tiktoken(model.mergeable_ranks, model.pattern, model.special_tokens).save(folder)
    return json.loads((folder / "tokenizer.json").read_text())


def _read(tmp_path: Path, obj: object) -> str:
    path = tmp_path / "tokenizer.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    with pytest.raises(TokenizerError) as caught:
        read_tokenizer_json(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
    return str(caught.value)


def test_the_base_file_reads(saved, tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    assert len(read_tokenizer_json(tmp_path / "tokenizer.json").vocab) > 256


def test_deep_nesting_and_a_nan_dropout_are_refused(tmp_path):
    assert "nested" in _read(tmp_path, '{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert "dropout nan is not supported" in _read(tmp_path, '{"model": {"type": "BPE", "dropout": NaN}}')


def _set(obj: dict, path: tuple, value: object) -> dict:
    obj = json.loads(json.dumps(obj))
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


@pytest.mark.parametrize("path,value,message", [
    (("model",), [1], "no 'model' object"),
    (("model", "vocab", "a"), "x", "vocab entry 'a' has id 'x'"),
    (("model", "vocab", "a"), 1.5, "vocab entry 'a' has id 1.5"),
    (("model", "vocab", "a"), -3, "has id -3"),
    (("model", "vocab", "a"), 10**30, "not an integer in 0.."),  # would size a lookup table
    (("model", "vocab", "a"), 0, "gives id 0 to both"),
    (("model", "merges"), [5], "merge 5 is not a pair"),
    (("model", "merges"), {"a": 1}, "merges must be a list"),
    (("added_tokens",), [1], "added token 1 needs"),
    (("added_tokens",), [{"id": 1}], "needs a string 'content'"),
    (("pre_tokenizer",), [1], "pre_tokenizer must be an object"),
    (("normalizer",), "NFC", "normalizer must be an object"),
    (("decoder",), {"type": "Sequence", "decoders": [1]}, "malformed tokenizer.json"),
    (("post_processor",), {"type": "TemplateProcessing", "single": [1], "special_tokens": {}},
     "malformed tokenizer.json"),
])
def test_values_of_the_wrong_type_are_named(saved, tmp_path, path, value, message):
    assert message in _read(tmp_path, _set(saved, path, value))
