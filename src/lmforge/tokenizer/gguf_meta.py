"""GGUF tokenizer metadata (`tokenizer.ggml.*`), read into a spec and written from one.

A GGUF file carries its tokenizer as metadata: the token strings (`tokens`), one type
per token (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), the merges
as "left right" strings, the special ids, and `pre`, llama.cpp's name for the
pre-tokenizer. Only `model == "gpt2"` (byte-level BPE) is supported. The `pre` name is
mapped to the model's pre-tokenizer (`pretokenize.PIPELINES`), together with the two
flags llama.cpp attaches to some names: `ignore_merges` and adding BOS by default.

Control tokens become special added tokens, user-defined ones plain added tokens: both
are matched whole in the text, as llama.cpp and transformers' GGUF loader do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lmforge.tokenizer.added import AddedToken
from lmforge.tokenizer.bpe import BPE
from lmforge.tokenizer.errors import TokenizerError
from lmforge.tokenizer.pretokenize import PIPELINES
from lmforge.tokenizer.spec import TokenizerSpec

logger = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class PreType:
    """What a `tokenizer.ggml.pre` name means: a pipeline and llama.cpp's flags for it."""

    pipeline: str
    ignore_merges: bool = False
    add_bos: bool = False


def _family(pipeline: str, names: Iterable[str], **flags: bool) -> dict[str, PreType]:
    return {name: PreType(pipeline, **flags) for name in names}


#: Supported `tokenizer.ggml.pre` values (llama.cpp's names for the models' pre-tokenizers).
# fmt: off
GGUF_PRE_TYPES: dict[str, PreType] = {
    **_family("gpt-2", ["gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling",
                        "exaone4", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "gigachat", "a.x-4.0",
                        "mellum"]),
    **_family("smollm", ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b",
                         "mellum2"]),
    **_family("llama-bpe", ["llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                            "lfm2", "jina-v5-nano"], ignore_merges=True, add_bos=True),
    **_family("llama-bpe", ["dbrx", "smaug-bpe", "chatglm-bpe"]),
    **_family("llama-bpe", ["glm4", "glm5"], ignore_merges=True),
    **_family("qwen2", ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
                        "solar-open", "grok-2"]),
    "qwen35": PreType("qwen35"),
    **_family("gpt-4o", ["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"]),
    "tekken": PreType("tekken", ignore_merges=True, add_bos=True),
    "seed-coder": PreType("seed-coder"),
    "ufakzeka": PreType("ufakzeka"),
    "minicpm5": PreType("minicpm5", ignore_merges=True),
    "deepseek-llm": PreType("deepseek-llm"),
    "deepseek-coder": PreType("deepseek-coder"),
    **_family("deepseek-v3", ["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"]),
    "falcon": PreType("falcon"),
    **_family("bloom", ["bloom", "poro-chat", "gpt3-finnish"]),
    "viking": PreType("viking"),
    "default": PreType("default"),
}
# fmt: on

_OTHER_MODELS = {
    "llama": "SentencePiece BPE",
    "gemma4": "SentencePiece-style BPE",
    "bert": "WordPiece",
    "t5": "Unigram",
    "rwkv": "RWKV's trie tokenizer",
    "plamo2": "PLaMo-2's tokenizer",
}


def _get(metadata: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    return value.tolist() if hasattr(value, "tolist") else value


def read_gguf_metadata(metadata: Mapping[str, Any]) -> TokenizerSpec:
    """The tokenizer described by a GGUF file's metadata (a plain dict of key -> value)."""
    model = _get(metadata, "tokenizer.ggml.model")
    if model is None:
        raise TokenizerError("GGUF metadata has no tokenizer.ggml.model: the file carries no tokenizer")
    if model != "gpt2":
        kind = _OTHER_MODELS.get(model, "an unknown kind of tokenizer")
        raise TokenizerError(
            f"GGUF tokenizer model {model!r} ({kind}) is not supported; lmforge runs "
            "byte-level BPE, tokenizer.ggml.model 'gpt2'"
        )
    pre = _get(metadata, "tokenizer.ggml.pre") or "default"
    if pre not in GGUF_PRE_TYPES:
        raise TokenizerError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(GGUF_PRE_TYPES)}"
        )
    pre_type = GGUF_PRE_TYPES[pre]
    tokens = _get(metadata, "tokenizer.ggml.tokens")
    merges = _get(metadata, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise TokenizerError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types = _get(metadata, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"GGUF metadata has {len(tokens)} tokens but {len(types)} token types")

    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for token_id, (text, kind) in enumerate(zip(tokens, types)):
        if kind == CONTROL:
            added.append(AddedToken(token_id, text, special=True))
        elif kind == USER_DEFINED:
            added.append(AddedToken(token_id, text, special=False))
        vocab.setdefault(text, token_id)
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise TokenizerError(f"GGUF merge {merge!r} is not 'left right'")
        pairs.append((left, right))

    def token_id(key: str) -> int | None:
        value = _get(metadata, key)
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    return TokenizerSpec(
        vocab=vocab,
        merges=pairs,
        pretokenizer=PIPELINES[pre_type.pipeline],
        added_tokens=added,
        ignore_merges=pre_type.ignore_merges,
        bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=token_id("tokenizer.ggml.eos_token_id"),
        pad_token_id=token_id("tokenizer.ggml.padding_token_id"),
        add_bos=bool(_get(metadata, "tokenizer.ggml.add_bos_token", pre_type.add_bos)),
        add_eos=bool(_get(metadata, "tokenizer.ggml.add_eos_token", False)),
        chat_template=_get(metadata, "tokenizer.chat_template"),
        gguf_pre=pre,
    )


def gguf_metadata(spec: TokenizerSpec, bpe: BPE) -> dict[str, Any]:
    """The `tokenizer.*` metadata keys that describe `spec` to llama.cpp."""
    pre = spec.gguf_pre if spec.gguf_pre in GGUF_PRE_TYPES else spec.pretokenizer.name
    if pre is None or PIPELINES[GGUF_PRE_TYPES[pre].pipeline] != spec.pretokenizer.canonical():
        raise TokenizerError(
            f"the pre-tokenizer ({spec.pretokenizer.describe()}) has no GGUF name llama.cpp knows, so "
            "llama.cpp would split text differently; it cannot be exported to GGUF (tokenizers trained "
            "with `lmforge tokenizer train --pattern llama3` (the default), gpt2, qwen2 or o200k export)"
        )
    if spec.normalizer is not None:
        logger.warning(
            "GGUF cannot store the %s normalizer; llama.cpp will not normalize text",
            "+".join(spec.normalizer.forms),
        )
    if GGUF_PRE_TYPES[pre].ignore_merges != spec.ignore_merges and _has_unreachable_tokens(spec, bpe):
        raise TokenizerError(
            f"GGUF pre-tokenizer {pre!r} implies ignore_merges={GGUF_PRE_TYPES[pre].ignore_merges}, "
            "which changes how this vocabulary encodes"
        )
    size = spec.vocab_size
    tokens = [f"[UNUSED_{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, token_id in spec.vocab.items():
        tokens[token_id], types[token_id] = text, NORMAL
    for token in spec.added_tokens:
        tokens[token.id], types[token.id] = token.content, CONTROL if token.special else USER_DEFINED
    out: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in spec.merges],
        "tokenizer.ggml.add_bos_token": spec.add_bos,
        "tokenizer.ggml.add_eos_token": spec.add_eos,
    }
    for key, value in (
        ("bos_token_id", spec.bos_token_id),
        ("eos_token_id", spec.eos_token_id),
        ("padding_token_id", spec.pad_token_id),
    ):
        if value is not None:
            out[f"tokenizer.ggml.{key}"] = value
    if spec.chat_template is not None:
        out["tokenizer.chat_template"] = spec.chat_template
    return out


def _has_unreachable_tokens(spec: TokenizerSpec, bpe: BPE) -> bool:
    """True when some merged token cannot be built from its own bytes (so ignore_merges matters)."""
    for left, right in spec.merges:
        if bpe.merge(bpe.symbols(left + right)) != [bpe.vocab[left + right]]:
            return True
    return False
