"""GGUF pre-tokenizer types against the ids of the models' own HF tokenizers.

llama.cpp ships vocabulary-only GGUFs of many models with a set of hard strings (.inp)
and the ids the model's original HF tokenizer gives for them (.out). We load each GGUF's
tokenizer metadata and must give the same ids, by the reference encoder and, for the
smaller vocabularies (the check that allows tiktoken takes a few seconds on 150k-token
ones), by the fast path too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.tokenizer import Tokenizer, TokenizerError

#: vocab file -> its tokenizer.ggml.pre, and whether to also run the fast path here (GPT-2 and
#: SmolLM2's pipelines are checked on both paths in test_oracles; deepseek-coder takes the
#: "tiktoken+python-split" path).
VOCABS = {
    "gpt-2": ("gpt-2", False),
    "starcoder": ("starcoder", False),
    "deepseek-coder": ("deepseek-coder", True),
    "deepseek-llm": ("deepseek-llm", False),
    "falcon": ("falcon", False),
    "llama-bpe": ("llama-bpe", False),
    "qwen2": ("qwen2", False),
    "qwen35": ("qwen35", False),
}


def read_cases(path: Path) -> list[tuple[str, list[int]]]:
    texts = (
        path.with_name(path.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    )
    ids = [
        [int(i) for i in line.split()] for line in path.with_name(path.name + ".out").read_text().split("\n")
    ]
    return list(zip(texts, ids))


@pytest.mark.parametrize("name", VOCABS)
def test_gguf_vocab_matches_hf_reference_ids(llama_cpp_vocabs, read_gguf_metadata, name):
    path = llama_cpp_vocabs / f"ggml-vocab-{name}.gguf"
    pre, try_fast = VOCABS[name]
    tok = Tokenizer.from_gguf_metadata(read_gguf_metadata(path))
    assert tok.spec.gguf_pre == pre
    encoders = [tok.without_fast_path()] + ([tok] if try_fast else [])
    for text, expected in read_cases(path):
        for encoder in encoders:
            assert encoder.encode(text, add_bos=False) == expected, (encoder.backend, text)
    if try_fast:
        assert tok.backend != "reference", tok.fast_path_reason


@pytest.mark.parametrize(
    "name, model",
    [("llama-spm", "llama"), ("bert-bge", "bert"), ("gemma-4", "gemma4"), ("nomic-bert-moe", "t5")],
)
def test_other_tokenizer_models_are_refused_by_name(llama_cpp_vocabs, read_gguf_metadata, name, model):
    metadata = read_gguf_metadata(llama_cpp_vocabs / f"ggml-vocab-{name}.gguf")
    with pytest.raises(TokenizerError, match=f"GGUF tokenizer model '{model}'"):
        Tokenizer.from_gguf_metadata(metadata)
