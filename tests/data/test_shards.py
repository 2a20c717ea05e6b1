"""Token shards: exact contents, a stable split, and clear errors on bad shards."""

import json

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.data.document import Document
from lmforge.data.errors import DataInputError
from lmforge.data.shards import (
    TokenizeConfig,
    is_validation,
    load_shard_set,
    open_shard,
    tokenize_documents,
)
from lmforge.tokenizer import load_tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "naïve café 東京 🙂 and <|endoftext|> as plain text",
    "def f(x):\n    return x * 2\n",
    "  leading and trailing spaces  ",
] * 10


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def _docs():
    return [Document(id=f"doc-{i}", text=t) for i, t in enumerate(TEXTS)]


def test_shards_hold_each_document_wrapped_in_bos_eos(tokenizer, tmp_path):
    config = TokenizeConfig(val_fraction=0.2, shard_tokens=1024)
    report = tokenize_documents(_docs(), tokenizer, tmp_path, config, tokenizer_name="smollm2")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for split in ("train", "val"):
        meta, shards = load_shard_set(tmp_path, split)
        expected = [
            [bos, *tokenizer.encode(d.text, add_bos=False, allow_special=False), eos]
            for d in _docs()
            if is_validation(d.id, 0.2) == (split == "val")
        ]
        got = []
        for shard in shards:
            assert shard.tokens.dtype == np.uint16
            bounds = [*shard.doc_starts.tolist(), len(shard.tokens)]
            got += [shard.tokens[a:b].tolist() for a, b in zip(bounds, bounds[1:])]
        assert got == expected
        assert meta["splits"][split]["tokens"] == sum(map(len, expected))
    assert report.splits["val"].documents == sum(is_validation(d.id, 0.2) for d in _docs())
    # special-token text inside a document is ordinary text, never a control token
    assert eos not in tokenizer.encode(TEXTS[1], add_bos=False, allow_special=False)


def test_split_depends_only_on_the_id():
    ids = [f"doc-{i}" for i in range(20000)]
    share = sum(is_validation(i, 0.1) for i in ids) / len(ids)
    assert 0.09 < share < 0.11
    assert [is_validation(i, 0.1) for i in ids[:100]] == [is_validation(i, 0.1) for i in ids[:100]]
    assert not any(is_validation(i, 0.0) for i in ids[:100])


def test_many_small_shards_when_the_limit_is_small(tokenizer, tmp_path):
    report = tokenize_documents(
        _docs() * 10, tokenizer, tmp_path, TokenizeConfig(val_fraction=0, shard_tokens=1024)
    )
    assert len(report.splits["train"].shards) > 3
    _, shards = load_shard_set(tmp_path)
    assert all(len(s) <= 1024 for s in shards)
    assert sum(len(s) for s in shards) == report.splits["train"].tokens


def test_bad_inputs_are_clear_errors(tokenizer, tmp_path):
    with pytest.raises(DataInputError, match="no documents"):
        tokenize_documents([Document("a", "")], tokenizer, tmp_path / "empty")
    with pytest.raises(DataInputError, match="val_fraction"):
        tokenize_documents(_docs(), tokenizer, tmp_path / "x", TokenizeConfig(val_fraction=1.5))
    with pytest.raises(DataInputError, match="no finished token shards"):
        load_shard_set(tmp_path / "nothing-here")
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(DataInputError, match="not a token shard"):
        open_shard(garbage)
    tokenize_documents(_docs(), tokenizer, tmp_path / "ok", TokenizeConfig(val_fraction=0))
    shard = tmp_path / "ok" / "train-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataInputError, match="truncated"):
        open_shard(shard)


def test_tokenize_command_end_to_end(smollm2_gguf, tmp_path, capsys):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "shards"
    code = main(["tokenize", str(source), "--tokenizer", str(smollm2_gguf), "-o", str(out), "--json", "-q"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["train"]["documents"] + report["splits"]["val"]["documents"] == len(TEXTS)
    assert (out / "meta.json").exists()
