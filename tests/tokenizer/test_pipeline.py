"""The rest of an HF tokenizer.json pipeline: normalizers, added-token flags, BOS/EOS
post-processing; and clear errors for everything lmforge does not run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import Tokenizer, TokenizerError, load_tokenizer

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PIECES = [
    "zq",
    "<S>",
    "<L>",
    "<R>",
    "dog",
    " ",
    "  ",
    "\u00a0",
    "\u3000",
    "a",
    "1",
    "_",
    "é",
    "e\u0301",
    "\u0301",
    "hot",
    "\n",
    "<|im_end|>",
    "x",
]
texts = st.lists(st.sampled_from(PIECES), max_size=10).map("".join)


@pytest.fixture(scope="module")
def smollm2_json(smollm2_hf_folder) -> dict:
    return json.loads((smollm2_hf_folder / "tokenizer.json").read_text())


def variant(base: dict, folder: Path, **changes) -> tuple[Tokenizer, object]:
    """A changed copy of SmolLM2's tokenizer.json, loaded by lmforge and by HF; `added_tokens`
    (made by `added`) get the ids after the vocabulary, in order."""
    obj = copy.deepcopy(base)
    n = len(obj["model"]["vocab"])
    obj["added_tokens"] += [t | {"id": n + k} for k, t in enumerate(changes.pop("added_tokens", []))]
    obj.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(obj))
    return (
        Tokenizer.from_tokenizer_json(folder / "tokenizer.json"),
        tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")),
    )


def added(content: str, **flags) -> dict:
    return {
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": False,
    } | flags


@pytest.fixture(scope="module")
def flagged(smollm2_json, tmp_path_factory):
    """SmolLM2 plus added tokens with each of HF's matching flags."""
    return variant(
        smollm2_json,
        tmp_path_factory.mktemp("flags"),
        added_tokens=[
            added("zq", single_word=True),
            added("<S>", single_word=True, lstrip=True, rstrip=True, special=True),
            added("<L>", lstrip=True, special=True),
            added("<R>", rstrip=True, special=True),
            added("dog", normalized=True),
        ],
    )


@SETTINGS
@given(text=texts)
def test_added_token_flags_match_hf(flagged, text):
    ours, hf = flagged
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids
    ids = ours.encode(text)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def normalized(smollm2_json, tmp_path_factory):
    return variant(
        smollm2_json,
        tmp_path_factory.mktemp("nfc"),
        added_tokens=[added("dog", normalized=True)],
        normalizer={"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "NFC"}]},
    )


@SETTINGS
@given(text=st.one_of(texts, st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=20)))
def test_nfc_normalizer_matches_hf(normalized, text):
    ours, hf = normalized
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_template_post_processor_adds_bos_by_default(smollm2_json, tmp_path):
    post = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    ours, hf = variant(smollm2_json, tmp_path, post_processor=post)
    assert ours.add_bos and ours.bos_token_id == 1
    for text in ("Hello", "", "a  1"):
        assert ours.encode(text) == hf.encode(text).ids
        assert ours.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False).ids


# --------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}, "model 'Unigram' is not supported"),
        ({"model": {"type": "WordPiece", "vocab": {"a": 0}}}, "model 'WordPiece' is not supported"),
        ({"model.byte_fallback": True}, "byte_fallback"),
        ({"model.dropout": 0.1}, "dropout"),
        ({"model.continuing_subword_prefix": "##"}, "continuing_subword_prefix"),
        ({"normalizer": {"type": "Lowercase"}}, "normalizer 'Lowercase' is not supported"),
        ({"normalizer": {"type": "Precompiled", "precompiled_charsmap": ""}}, "normalizer 'Precompiled'"),
        (
            {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}},
            "pre-tokenizer 'Metaspace' is not supported",
        ),
        ({"pre_tokenizer": None}, "no pre_tokenizer"),
        (
            {"decoder": {"type": "Metaspace", "replacement": "▁"}},
            "decoder \\['Metaspace'\\] is not supported",
        ),
        (
            {"post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]}},
            "post-processor 'RobertaProcessing' is not supported",
        ),
        ({"model.merges": [["Ġ", "nope"]]}, "not in the vocabulary"),
    ],
)
def test_unsupported_tokenizer_json_is_refused_by_name(smollm2_json, tmp_path, change, message):
    obj = copy.deepcopy(smollm2_json)
    for key, value in change.items():
        if key.startswith("model."):
            obj["model"][key.removeprefix("model.")] = value
        else:
            obj[key] = value
    (tmp_path / "tokenizer.json").write_text(json.dumps(obj))
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json").encode("x")


def test_bad_paths_and_files(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(TokenizerError, match="unknown tokenizer format"):
        load_tokenizer(tmp_path / "notes.txt")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a readable JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(TokenizerError, match="GGUF"):
        load_tokenizer(tmp_path / "fake.gguf")
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_vocab_merges(tmp_path / "vocab.json", tmp_path / "merges.txt")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokenizer.ggml.model": "llama"}, "model 'llama' \\(SentencePiece BPE\\) is not supported"),
        ({"tokenizer.ggml.model": "bert"}, "model 'bert' \\(WordPiece\\)"),
        ({"tokenizer.ggml.model": None}, "no tokenizer.ggml.model"),
        ({"tokenizer.ggml.pre": "kimi-k2"}, "pre-tokenizer 'kimi-k2' is not supported"),
        ({"tokenizer.ggml.merges": None}, "lacks tokenizer.ggml.tokens or tokenizer.ggml.merges"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "49152 tokens but 2 token types"),
    ],
)
def test_unsupported_gguf_metadata_is_refused_by_name(smollm2_metadata, change, message):
    metadata = {k: v for k, v in smollm2_metadata.items()} | change
    metadata = {k: v for k, v in metadata.items() if v is not None}
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_gguf_metadata(metadata)


def test_bad_ids_and_missing_bos(gpt2):
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        gpt2.decode([50257])
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        gpt2.token_bytes(-1)
    assert gpt2.encode("hi", add_bos=True)[0] == 50256
    no_bos = Tokenizer(
        type(gpt2.spec)(vocab=gpt2.spec.vocab, merges=gpt2.spec.merges, pretokenizer=gpt2.spec.pretokenizer)
    )
    with pytest.raises(TokenizerError, match="no BOS token"):
        no_bos.encode("hi", add_bos=True)
    assert no_bos.without_fast_path().encode("hi") == gpt2.encode("hi")
