"""Pre-tokenizer steps cut text exactly like HF `tokenizers`' pre-tokenizers; fused regexes
cut exactly like the step sequences they stand for."""

from __future__ import annotations

import json

import pytest
import regex
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import TokenizerError
from lmforge.tokenizer.bytelevel import (
    ALPHABET,
    BYTE_TO_CHAR,
    bytes_to_chars,
    chars_to_bytes,
    token_string_bytes,
)
from lmforge.tokenizer.pretokenize import (
    CL100K_POSSESSIVE_PATTERN,
    GPT2_PATTERN,
    PATTERNS,
    PIPELINES,
    TOTAL_PATTERNS,
    ByteLevel,
    Digits,
    PreTokenizer,
    Split,
)

pre_tokenizers = tokenizers.pre_tokenizers

ODD = " \t\n\r\x0b\x85\u00a0\u3000'sdtmlvreSLT0123456789²½aAéß中🦙ſ.,!-_<|>"
#: Characters assigned in Python's Unicode tables (14.0): newer ones are letters to the `regex`
#: module but unassigned to HF's Oniguruma and tiktoken's Rust regex, so they may be cut apart.
ASSIGNED = st.characters(exclude_categories=("Cs", "Cn"))
texts = st.one_of(st.text(ASSIGNED, max_size=30), st.text(alphabet=st.sampled_from(ODD), max_size=30))
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def hf_pieces(pre_tokenizer, text: str) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


# --------------------------------------------------------------------------- byte alphabet


def test_byte_alphabet_is_gpt2s():
    assert len(ALPHABET) == 256
    assert BYTE_TO_CHAR[ord("A")] == "A" and BYTE_TO_CHAR[ord(" ")] == "Ġ" and BYTE_TO_CHAR[ord("\n")] == "Ċ"
    assert all(not c.isspace() and c.isprintable() for c in ALPHABET)


@given(st.binary(max_size=64))
def test_byte_alphabet_round_trips(data):
    assert chars_to_bytes(bytes_to_chars(data)) == data
    assert token_string_bytes(bytes_to_chars(data)) == data


def test_non_alphabet_strings_are_their_utf8():
    assert token_string_bytes("<|im start|>") == b"<|im start|>"  # a real space: not byte-spelled
    with pytest.raises(ValueError):
        chars_to_bytes("a b")


# --------------------------------------------------------------------------- steps vs HF


@pytest.mark.parametrize(
    "behavior", ["removed", "isolated", "merged_with_previous", "merged_with_next", "contiguous"]
)
@pytest.mark.parametrize("invert", [False, True])
@SETTINGS
@given(text=texts)
def test_split_behaviors_match_hf(behavior, invert, text):
    pattern = r"\p{N}|\s+|'"
    ours = Split(pattern, behavior, invert).apply(text)
    hf = pre_tokenizers.Split(tokenizers.Regex(pattern), behavior=behavior, invert=invert)
    assert ours == hf_pieces(hf, text)


@SETTINGS
@given(text=texts)
def test_literal_split_matches_hf(text):
    ours = Split("a.", "isolated", literal=True).apply(text + "a.b")
    assert ours == hf_pieces(pre_tokenizers.Split("a.", behavior="isolated"), text + "a.b")


@pytest.mark.parametrize("individual", [True, False])
@SETTINGS
@given(text=texts)
def test_digits_match_hf(individual, text):
    assert Digits(individual).apply(text) == hf_pieces(
        pre_tokenizers.Digits(individual_digits=individual), text
    )


@pytest.mark.parametrize("add_prefix_space", [False, True])
@pytest.mark.parametrize("use_regex", [False, True])
@SETTINGS
@given(text=texts)
def test_byte_level_matches_hf(add_prefix_space, use_regex, text):
    ours = ByteLevel(add_prefix_space, use_regex).apply(text)
    hf = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=use_regex)
    assert ours == hf_pieces(hf, text)


@SETTINGS
@given(text=texts)
def test_sequence_with_prefix_space_per_piece_matches_hf(text):
    """HF's ByteLevel adds its prefix space to every piece an earlier step made."""
    ours = PreTokenizer((Digits(False), Split(r"\s+", "merged_with_next"), ByteLevel(True, True))).split(text)
    hf = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.Split(tokenizers.Regex(r"\s+"), behavior="merged_with_next"),
            pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True),
        ]
    )
    assert ours == hf_pieces(hf, text)


@pytest.mark.parametrize(
    "name",
    [
        "llama-bpe",
        "qwen2",
        "qwen35",
        "gpt-4o",
        "tekken",
        "deepseek-coder",
        "deepseek-llm",
        "default",
        "bloom",
    ],
)
@SETTINGS
@given(text=texts)
def test_named_pipelines_match_hf(name, text):
    pipeline = PIPELINES[name]
    hf_pre = tokenizers.Tokenizer.from_str(json.dumps(_wrap(pipeline.to_hf()))).pre_tokenizer
    assert pipeline.split(text) == hf_pieces(hf_pre, text)


def _wrap(pre_tokenizer: dict) -> dict:
    """A minimal tokenizer.json around a pre-tokenizer, to let HF parse it."""
    return {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": None,
        "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
    }


# --------------------------------------------------------------------------- fused regexes


@pytest.mark.parametrize("name", ["gpt-2", "smollm", "llama-bpe", "qwen2", "qwen35", "gpt-4o", "tekken"])
@SETTINGS
@given(text=texts)
def test_fused_pattern_cuts_like_the_steps(name, text):
    pipeline = PIPELINES[name]
    fused = pipeline.fused_pattern
    assert fused is not None
    pieces = [bytes_to_chars(m.group().encode()) for m in regex.finditer(fused, text)]
    assert pieces == pipeline.split(text)


@pytest.mark.parametrize("pattern", sorted(TOTAL_PATTERNS))
@SETTINGS
@given(text=texts)
def test_total_patterns_leave_no_gaps(pattern, text):
    assert "".join(m.group() for m in regex.finditer(pattern, text)) == text


def test_multi_regex_pipelines_have_no_fused_pattern():
    assert PIPELINES["deepseek-llm"].fused_pattern is None
    assert PreTokenizer((Split(GPT2_PATTERN), ByteLevel(use_regex=False))).fused_pattern == GPT2_PATTERN
    assert PreTokenizer((Split("x+"), ByteLevel(use_regex=False))).fused_pattern is None  # not known total


def test_names():
    assert PIPELINES["smollm"].name == "smollm"
    assert PreTokenizer((Split(PATTERNS["llama3"]), ByteLevel(use_regex=False))).name == "llama-bpe"
    assert PreTokenizer((Split("x"), ByteLevel())).name is None
    assert PreTokenizer((Split(GPT2_PATTERN), ByteLevel(use_regex=False))).name == "gpt-2"
    # tiktoken's newer spelling of cl100k keeps "\r " whole at the end of a text: not llama.cpp's regex.
    assert PreTokenizer((Split(CL100K_POSSESSIVE_PATTERN), ByteLevel(use_regex=False))).name is None
    assert [m.group() for m in regex.finditer(CL100K_POSSESSIVE_PATTERN, "a\r ")] == ["a", "\r "]
    assert [m.group() for m in regex.finditer(PATTERNS["cl100k"], "a\r ")] == ["a", "\r", " "]


# --------------------------------------------------------------------------- tokenizer.json


def test_hf_json_round_trip():
    for pipeline in PIPELINES.values():
        assert PreTokenizer.from_hf(pipeline.to_hf()) == pipeline


@pytest.mark.parametrize(
    "obj, message",
    [
        (None, "no pre_tokenizer"),
        ({"type": "Metaspace", "replacement": "▁"}, "'Metaspace' is not supported"),
        ({"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}]}, "'Whitespace' is not supported"),
        ({"type": "Split", "pattern": {"Regex": "x"}, "behavior": "Isolated"}, "exactly one ByteLevel"),
        (
            {"type": "Sequence", "pretokenizers": [{"type": "ByteLevel"}, {"type": "ByteLevel"}]},
            "exactly one ByteLevel",
        ),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": "x"}, "behavior": "Odd"},
                    {"type": "ByteLevel"},
                ],
            },
            "behavior 'Odd'",
        ),
    ],
)
def test_unsupported_pre_tokenizers_are_refused(obj, message):
    with pytest.raises(TokenizerError, match=message):
        PreTokenizer.from_hf(obj)
