"""Same ids as the originals: tiktoken for GPT-2 and cl100k, HF `tokenizers` for SmolLM2.

Each tokenizer is checked three ways on real prose, hand-picked hard cases and random
text: lmforge's fast path (tiktoken), its reference encoder, and the oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.bytelevel import bytes_to_chars

HARD_CASES: list[str] = json.loads(Path(__file__).with_name("hard_cases.json").read_text())
FRAGMENTS = HARD_CASES + [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "'s",
    "'LL",
    " ",
    "  ",
    "\n",
    "7",
    "42",
]
ODD_CHARS = " \t\n\r\x0b\x0c\x1c\x85\u00a0\u2028\u3000'sdtmlvreSDTLVRE0123456789²½٣aAéß中🦙ſ\u212a.,!-_<|>"

#: Random text: any assigned character (as of Python's Unicode 14.0 tables: a newer character
#: may be a letter to the `regex` module and unassigned to HF's and tiktoken's regex engines),
#: text over a small tricky alphabet, and glued hard cases.
texts = st.one_of(
    st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=40),
    st.text(alphabet=st.sampled_from(ODD_CHARS), max_size=40),
    st.lists(st.sampled_from(FRAGMENTS), max_size=6).map("".join),
)
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- GPT-2


@pytest.fixture(scope="module")
def gpt2_oracle(tiktoken_encodings):
    return tiktoken_encodings["gpt2"][3]


def test_gpt2_uses_tiktoken_with_its_own_ranks(gpt2, tiktoken_encodings):
    assert gpt2.backend == "tiktoken"
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_token_id == gpt2.bos_token_id == 50256
    assert gpt2._fast.encoding._mergeable_ranks == tiktoken_encodings["gpt2"][0]  # ids are GPT-2's ranks


def test_gpt2_prose(gpt2, gpt2_oracle, prose_text):
    expected = gpt2_oracle.encode_ordinary(prose_text)
    assert gpt2.encode(prose_text, allow_special=False) == expected
    assert gpt2.without_fast_path().encode(prose_text, allow_special=False) == expected
    assert gpt2.decode(expected) == prose_text


@pytest.mark.parametrize("text", HARD_CASES)
def test_gpt2_hard_cases(gpt2, gpt2_oracle, text):
    expected = gpt2_oracle.encode(text, allowed_special="all")
    assert gpt2.encode(text) == expected
    assert gpt2.without_fast_path().encode(text) == expected
    assert gpt2.encode(text, allow_special=False) == gpt2_oracle.encode_ordinary(text)
    assert gpt2.decode(expected) == text


@SETTINGS
@given(text=texts)
def test_gpt2_random_text(gpt2, gpt2_oracle, text):
    expected = gpt2_oracle.encode(text, allowed_special="all")
    assert gpt2.encode(text) == expected
    assert gpt2.without_fast_path().encode(text) == expected
    assert gpt2.decode(gpt2.encode(text)) == text


# --------------------------------------------------------------------------- cl100k


@pytest.fixture(scope="module")
def cl100k(tiktoken_encodings) -> Tokenizer:
    ranks, pattern, specials, _ = tiktoken_encodings["cl100k_base"]
    return Tokenizer.from_tiktoken(ranks, pattern, specials)


@pytest.fixture(scope="module")
def cl100k_reference(cl100k) -> Tokenizer:
    """cl100k run by the reference encoder on the merges recovered from the ranks."""
    return cl100k.without_fast_path()


def test_cl100k_prose(cl100k, cl100k_reference, tiktoken_encodings, prose_text):
    oracle = tiktoken_encodings["cl100k_base"][3]
    expected = oracle.encode_ordinary(prose_text)
    assert cl100k.backend == "tiktoken"
    assert cl100k.encode(prose_text, allow_special=False) == expected
    assert cl100k_reference.encode(prose_text, allow_special=False) == expected


@pytest.mark.parametrize("text", HARD_CASES)
def test_cl100k_hard_cases(cl100k, cl100k_reference, tiktoken_encodings, text):
    oracle = tiktoken_encodings["cl100k_base"][3]
    expected = oracle.encode(text, allowed_special="all")
    assert cl100k.encode(text) == expected
    assert cl100k_reference.encode(text) == expected
    assert cl100k.decode(expected) == text


@SETTINGS
@given(text=texts)
def test_cl100k_random_text(cl100k, cl100k_reference, tiktoken_encodings, text):
    expected = tiktoken_encodings["cl100k_base"][3].encode(text, allowed_special="all")
    assert cl100k.encode(text) == expected
    assert cl100k_reference.encode(text) == expected
    assert cl100k.decode(expected) == text


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_json(smollm2_hf_folder) -> Tokenizer:
    return Tokenizer.from_tokenizer_json(smollm2_hf_folder / "tokenizer.json")


def _spellable(tok: Tokenizer, text: str) -> bool:
    """True when every byte of `text` has a token (SmolLM2 lacks a few, e.g. 0x04)."""
    return all(bytes_to_chars(bytes([b])) in tok.spec.vocab for b in set(text.encode()))


def test_smollm2_loads_from_gguf(smollm2_tok):
    assert smollm2_tok.vocab_size == 49152
    assert smollm2_tok.spec.gguf_pre == "smollm"
    assert (smollm2_tok.bos_token_id, smollm2_tok.eos_token_id, smollm2_tok.pad_token_id) == (1, 2, 2)
    assert smollm2_tok.special_tokens["<|im_start|>"] == 1 and len(smollm2_tok.special_tokens) == 17
    assert smollm2_tok.add_bos is False
    assert smollm2_tok.backend == "tiktoken"
    assert smollm2_tok.chat_template and "<|im_start|>" in smollm2_tok.chat_template


def test_smollm2_json_matches_gguf(smollm2_tok, smollm2_json):
    assert smollm2_json.spec.vocab == smollm2_tok.spec.vocab
    assert smollm2_json.spec.merges == smollm2_tok.spec.merges
    assert smollm2_json.pretokenizer == smollm2_tok.pretokenizer
    assert smollm2_json.eos_token_id == smollm2_tok.eos_token_id
    assert smollm2_json.chat_template == smollm2_tok.chat_template


def test_smollm2_prose(smollm2_tok, smollm2_json, smollm2_hf, prose_text):
    expected = smollm2_hf.encode(prose_text, add_special_tokens=False).ids
    assert smollm2_tok.encode(prose_text) == expected
    assert smollm2_tok.without_fast_path().encode(prose_text) == expected
    assert smollm2_json.encode(prose_text) == expected
    assert smollm2_tok.decode(expected) == prose_text


@pytest.mark.parametrize("text", HARD_CASES + ["\x04 dropped \x1d", "plane 4 \U00040000", "<|im_start|>"])
def test_smollm2_hard_cases(smollm2_tok, smollm2_json, smollm2_hf, text):
    expected = smollm2_hf.encode(text, add_special_tokens=False).ids
    assert smollm2_tok.encode(text) == expected
    assert smollm2_tok.without_fast_path().encode(text) == expected
    assert smollm2_json.encode(text) == expected
    assert smollm2_tok.decode(expected) == smollm2_hf.decode(expected, skip_special_tokens=False)
    if _spellable(smollm2_tok, text):
        assert smollm2_tok.decode(expected) == text


@SETTINGS
@given(text=texts)
def test_smollm2_random_text(smollm2_tok, smollm2_hf, text):
    expected = smollm2_hf.encode(text, add_special_tokens=False).ids
    assert smollm2_tok.encode(text) == expected
    assert smollm2_tok.without_fast_path().encode(text) == expected
    assert smollm2_tok.decode(expected) == smollm2_hf.decode(expected, skip_special_tokens=False)
    if _spellable(smollm2_tok, text):
        assert smollm2_tok.decode(expected) == text


@SETTINGS
@given(ids=st.lists(st.integers(0, 49151), max_size=12))
def test_smollm2_decode_of_any_ids_matches_hf(smollm2_tok, smollm2_hf, ids):
    """Arbitrary ids (broken UTF-8 included) decode like HF: U+FFFD per maximal bad subpart."""
    assert smollm2_tok.decode(ids) == smollm2_hf.decode(ids, skip_special_tokens=False)
    assert smollm2_tok.decode(ids, skip_special=True) == smollm2_hf.decode(ids, skip_special_tokens=True)
    assert smollm2_tok.decode_bytes(ids) == b"".join(smollm2_tok.token_bytes(i) for i in ids)


def test_smollm2_special_tokens_can_be_plain_text(smollm2_tok, smollm2_hf):
    text = "say <|im_end|> please"
    assert smollm2_tok.encode(text) == smollm2_hf.encode(text, add_special_tokens=False).ids
    plain = smollm2_tok.encode(text, allow_special=False)
    assert smollm2_tok.special_tokens["<|im_end|>"] not in plain
    assert smollm2_tok.decode(plain) == text


def test_transformers_gguf_conversion_misses_smollm2_digit_split(smollm2_tok, smollm2_hf_folder):
    """Why the oracle's pre-tokenizer is patched: transformers converts llama.cpp's "smollm"
    pre type to plain GPT-2 splitting, which differs from SmolLM2 before a digit."""
    import tokenizers

    converted = tokenizers.Tokenizer.from_file(str(smollm2_hf_folder / "tokenizer.converted.json"))
    text = "a  1"
    assert converted.encode(text).ids != smollm2_tok.encode(text)
    assert smollm2_tok.encode("x 1") == converted.encode("x 1").ids  # no difference without the space run


# --------------------------------------------------------------------------- o200k


@pytest.fixture(scope="module")
def o200k(tiktoken_encodings) -> Tokenizer:
    ranks, pattern, specials, _ = tiktoken_encodings["o200k_base"]
    return Tokenizer.from_tiktoken(ranks, pattern, specials)


def test_o200k_prose_and_hard_cases(o200k, tiktoken_encodings, prose_text):
    oracle = tiktoken_encodings["o200k_base"][3]
    assert o200k.backend == "tiktoken"
    assert o200k.encode(prose_text, allow_special=False) == oracle.encode_ordinary(prose_text)
    reference = o200k.without_fast_path()
    for text in HARD_CASES:
        expected = oracle.encode(text, allowed_special="all")
        assert o200k.encode(text) == expected
        assert reference.encode(text) == expected
        assert o200k.decode(expected) == text
