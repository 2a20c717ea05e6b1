"""The reference encoder follows HF's BPE rules; ranks.py knows when tiktoken may stand in.

Small hand-made vocabularies exercise each rule against HF `tokenizers` itself, and the
cases where tiktoken would differ (the fast path must then step aside, and say why).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import Tokenizer, TokenizerError
from lmforge.tokenizer.bytelevel import BYTE_TO_CHAR
from lmforge.tokenizer.ranks import merges_from_ranks, read_tiktoken_file, tiktoken_ranks

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
small_texts = st.text(alphabet=st.sampled_from("abcz  \n"), max_size=24)


def toy_json(
    merges: list[tuple[str, str]], *, drop_bytes: str = "", reverse_ids: bool = False, **model: object
) -> dict:
    """A byte-level BPE tokenizer.json over all (or most) single bytes plus `merges`."""
    vocab = [c for c in BYTE_TO_CHAR if c not in drop_bytes]
    for left, right in merges:
        if left + right not in vocab:
            vocab.append(left + right)
    ids = range(len(vocab) - 1, -1, -1) if reverse_ids else range(len(vocab))
    return {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": dict(zip(vocab, ids)),
            "merges": [list(m) for m in merges],
        }
        | model,
    }


def load_both(tmp_path: Path, obj: dict) -> tuple[Tokenizer, object]:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(obj))
    return Tokenizer.from_tokenizer_json(path), tokenizers.Tokenizer.from_file(str(path))


def hf_ids(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False).ids


# --------------------------------------------------------------------------- merge rules vs HF


def test_lowest_rank_first_and_only_listed_pairs(tmp_path):
    ours, hf = load_both(tmp_path, toy_json([("b", "c"), ("a", "b"), ("ab", "c")]))
    assert ours.encode("abc") == hf_ids(hf, "abc")  # (b, c) first: [a, bc], and (a, bc) is no merge
    assert len(ours.encode("abc")) == 2
    assert ours.encode("ab") == hf_ids(hf, "ab")


def test_a_pair_listed_twice_keeps_its_last_rank(tmp_path):
    ours, hf = load_both(tmp_path, toy_json([("a", "b"), ("b", "c"), ("a", "b")]))
    assert ours.encode("abc") == hf_ids(hf, "abc")
    assert ours.decode(ours.encode("abc")) == "abc"


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_ignore_merges_returns_whole_tokens(tmp_path, ignore_merges):
    # "abc" is in the vocabulary but the merges cannot build it (they stop at [a, bc]).
    ours, hf = load_both(
        tmp_path, toy_json([("b", "c"), ("a", "b"), ("ab", "c")], ignore_merges=ignore_merges)
    )
    for text in ("abc", "abcabc", " abc"):
        assert ours.encode(text) == hf_ids(hf, text)


TOY_MERGES = [("a", "b"), ("b", "c"), ("ab", "c"), ("Ġ", "a"), ("c", "c"), ("cc", "cc"), ("Ġ", "ab")]
TOY_MODELS = {
    "plain": toy_json(TOY_MERGES),
    "ids-reversed": toy_json(TOY_MERGES, reverse_ids=True),
    "no-z": toy_json(TOY_MERGES, drop_bytes="z"),
    "unk": toy_json(TOY_MERGES, drop_bytes="z", unk_token="c"),
    "fused-unk": toy_json(TOY_MERGES, drop_bytes="z", unk_token="c", fuse_unk=True),
}


@pytest.fixture(scope="module")
def toys(tmp_path_factory) -> dict[str, tuple[Tokenizer, object]]:
    return {name: load_both(tmp_path_factory.mktemp(name), obj) for name, obj in TOY_MODELS.items()}


@pytest.mark.parametrize("name", TOY_MODELS)
@SETTINGS
@given(text=small_texts)
def test_toy_models_match_hf_on_both_paths(toys, name, text):
    ours, hf = toys[name]
    expected = hf_ids(hf, text)
    assert ours.encode(text) == expected
    assert ours.without_fast_path().encode(text) == expected


def test_toy_backends(toys):
    assert toys["plain"][0].backend == "tiktoken"
    assert (
        toys["ids-reversed"][0].backend == "tiktoken" and toys["ids-reversed"][0]._fast.rank_to_id is not None
    )
    assert toys["no-z"][0].backend == "tiktoken"
    assert not toys["no-z"][0]._fast.can_encode("xyz") and toys["no-z"][0]._fast.can_encode("xy")
    assert toys["unk"][0].backend == "reference" and "unk_token" in toys["unk"][0].fast_path_reason


# --------------------------------------------------------------------------- the fast path steps aside


def test_fast_path_refuses_a_vocabulary_tiktoken_would_encode_differently(tmp_path, caplog):
    ours, hf = load_both(tmp_path, toy_json([("b", "c"), ("a", "b"), ("ab", "c")]))
    with caplog.at_level(logging.WARNING, logger="lmforge.tokenizer"):
        assert ours.backend == "reference"
    assert "tiktoken would glue" in ours.fast_path_reason
    assert "reference encoder" in caplog.text
    assert ours.encode("abc") == hf_ids(hf, "abc")


def test_interleaved_merges_of_two_tokens_are_refused(tmp_path):
    """tiktoken ranks tokens, not merges: "abc" (merges 2 and 4) and "cc" (merge 3) have no order."""
    ours, hf = load_both(tmp_path, toy_json([("a", "b"), ("b", "c"), ("ab", "c"), ("c", "c"), ("a", "bc")]))
    assert ours.backend == "reference"
    assert "interleaved" in ours.fast_path_reason
    for text in ("abc", "abccc", "bcab"):
        assert ours.encode(text) == hf_ids(hf, text)


# --------------------------------------------------------------------------- tiktoken ranks <-> merges


def test_merges_recovered_from_gpt2_ranks_are_gpt2s_merges(gpt2, tiktoken_encodings):
    ranks = tiktoken_encodings["gpt2"][0]
    vocab, merges = merges_from_ranks(ranks)
    assert merges == gpt2.spec.merges
    assert vocab == {k: v for k, v in gpt2.spec.vocab.items() if v < 50256}


def test_gpt2_merges_express_as_gpt2_ranks(gpt2, tiktoken_encodings):
    table = tiktoken_ranks(gpt2.bpe)
    assert table.mergeable_ranks == tiktoken_encodings["gpt2"][0]
    assert table.rank_to_id is None and not table.missing_bytes


def test_tiktoken_file_round_trip(tmp_path, tiktoken_encodings):
    import base64

    ranks = tiktoken_encodings["gpt2"][0]
    path = tmp_path / "gpt2.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    assert read_tiktoken_file(path) == ranks
    (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(TokenizerError, match="bad.tiktoken:1"):
        read_tiktoken_file(tmp_path / "bad.tiktoken")
