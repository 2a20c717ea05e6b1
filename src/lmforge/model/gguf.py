"""GGUF models: llama.cpp's tensor names and hyperparameter keys <-> lmforge's `Transformer`.

The container itself (reading, writing, block formats) is lmforge.formats; this module
is the model mapping: `load_gguf_model` and `export_gguf`.

One subtlety of the mapping: llama.cpp applies RoPE to adjacent channel pairs
(2i, 2i+1), while lmforge, like Hugging Face checkpoints, pairs channel i with i+hd/2.
llama.cpp's converter therefore reorders the rows of each head of W_q and W_k; we undo
that on load and redo it on export. Both layouts give the same attention scores, since
q and k are permuted alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmforge.formats.ggml import QUANTIZERS, GGMLType, decode_q4, decode_q8_0, to_bf16
from lmforge.formats.gguf import GGUFError, GGUFFile, TensorData, TensorInfo, write_gguf
from lmforge.model.config import ConfigError, ModelConfig

# --------------------------------------------------------------------------- model mapping


@dataclass(frozen=True)
class _Architecture:
    name: str
    permute_qk: bool  # llama.cpp's converter reorders W_q/W_k rows for the adjacent-pair RoPE
    qkv_bias: bool | None  # None: whatever the tensors say


ARCHITECTURES = {
    "llama": _Architecture("llama", permute_qk=True, qkv_bias=None),
    "qwen2": _Architecture("qwen2", permute_qk=False, qkv_bias=True),  # llama.cpp runs Qwen2 with NeoX RoPE
}

# `{arch}.` keys the mapping reads; any other key in the architecture's namespace is an error.
_HYPERPARAMETER_KEYS = {
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "attention.sliding_window",
    "rope.freq_base", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor", "rope.scale_linear",
    "expert_count", "expert_used_count",
}
# Keys that describe provenance, not the computation.
_INFORMATIONAL_KEYS = {"tensor_data_layout", "rope.scaling.finetuned", "rope.scaling.original_context_length"}


def config_from_gguf(metadata: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> ModelConfig:
    """The `ModelConfig` a GGUF file describes; whatever lmforge cannot express is a GGUFError."""
    arch_name = metadata.get("general.architecture")
    if arch_name is None:
        raise GGUFError("GGUF metadata has no general.architecture")
    if arch_name not in ARCHITECTURES:
        raise GGUFError(f"general.architecture {arch_name!r} is not supported "
                        f"(lmforge maps: {', '.join(ARCHITECTURES)})")
    if metadata.get("split.count", 1) > 1:
        raise GGUFError(f"this GGUF is part of a {metadata['split.count']}-file split; merge it first")
    arch = ARCHITECTURES[arch_name]
    prefix = f"{arch_name}."
    unknown = sorted(k for k in metadata if k.startswith(prefix)
                     and k[len(prefix):] not in _HYPERPARAMETER_KEYS | _INFORMATIONAL_KEYS)
    if unknown:
        raise GGUFError(f"lmforge cannot express these {arch_name} hyperparameters: {', '.join(unknown)}")

    def get(key: str, kind: type, default: Any = None) -> Any:
        value = metadata.get(prefix + key, default)
        if value is None:
            raise GGUFError(f"GGUF metadata lacks required key {prefix + key}")
        if isinstance(value, list):
            raise GGUFError(f"{prefix + key} holds per-layer values, which lmforge cannot express")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise GGUFError(f"{prefix + key} should be {kind.__name__}, got {value!r}")
        return value

    d_model, n_heads = get("embedding_length", int), get("attention.head_count", int)
    head_dim = get("attention.key_length", int, d_model // n_heads)
    if get("attention.value_length", int, head_dim) != head_dim:
        raise GGUFError("attention.key_length and attention.value_length differ; lmforge needs them equal")
    if get("rope.dimension_count", int, head_dim) != head_dim:
        raise GGUFError(f"{prefix}rope.dimension_count is {metadata[prefix + 'rope.dimension_count']}, "
                        f"not the head dim {head_dim}: partial rotary embeddings are not supported")
    if "rope_freqs.weight" in tensors:
        raise GGUFError("rope_freqs.weight (per-channel RoPE frequency factors, e.g. Llama 3.1 scaling) "
                        "is not supported")
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF has no token_embd.weight tensor")
    vocab_size = tensors["token_embd.weight"].shape[0]
    if get("vocab_size", int, vocab_size) != vocab_size:
        raise GGUFError(f"{prefix}vocab_size {metadata[prefix + 'vocab_size']} disagrees with "
                        f"token_embd.weight rows ({vocab_size})")
    n_experts = get("expert_count", int, 0)

    values: dict[str, Any] = dict(
        vocab_size=vocab_size, d_model=d_model, n_layers=get("block_count", int), n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", int, n_heads),
        head_dim=head_dim if head_dim != d_model // n_heads else None,
        d_ff=get("feed_forward_length", int), max_seq_len=get("context_length", int),
        position="rope", rope_theta=float(get("rope.freq_base", float, 10000.0)),
        rope_scaling=_rope_scaling(metadata, prefix),
        norm="rmsnorm", norm_eps=get("attention.layer_norm_rms_epsilon", float), mlp="swiglu",
        qkv_bias=arch.qkv_bias if arch.qkv_bias is not None else "blk.0.attn_q.bias" in tensors,
        out_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors or "blk.0.ffn_up_exps.bias" in tensors,
        norm_bias=False, sliding_window=get("attention.sliding_window", int, 0) or None,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        n_experts=n_experts, n_experts_per_token=get("expert_used_count", int, 2) if n_experts else 2,
        tie_embeddings="output.weight" not in tensors,
        extra={"gguf": {"architecture": arch_name, "name": metadata.get("general.name"),
                        "file_type": metadata.get("general.file_type")}},
    )
    try:
        return ModelConfig(**values)
    except ConfigError as err:
        raise GGUFError(f"GGUF hyperparameters do not make a valid lmforge model: {err}") from err


def _rope_scaling(metadata: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    kind = metadata.get(prefix + "rope.scaling.type", "none")
    factor = metadata.get(prefix + "rope.scaling.factor")
    if prefix + "rope.scale_linear" in metadata and kind == "none":  # the key older files use
        kind, factor = "linear", metadata[prefix + "rope.scale_linear"]
    if kind == "none":
        return None
    if kind != "linear":
        raise GGUFError(f"{prefix}rope.scaling.type {kind!r} is not supported (lmforge maps: none, linear)")
    if not isinstance(factor, float | int) or factor <= 0:
        raise GGUFError(f"linear RoPE scaling needs a positive {prefix}rope.scaling.factor, got {factor!r}")
    return None if factor == 1 else {"type": "linear", "factor": float(factor)}


def tensor_names(config: ModelConfig) -> dict[str, str]:
    """lmforge state-dict name -> GGUF tensor name, for every tensor except MoE experts."""
    names = {"embed.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        pairs = [("attn_norm.weight", "attn_norm.weight"), ("mlp_norm.weight", "ffn_norm.weight")]
        projections = [("attn.q_proj", "attn_q", config.qkv_bias), ("attn.k_proj", "attn_k", config.qkv_bias),
                       ("attn.v_proj", "attn_v", config.qkv_bias),
                       ("attn.o_proj", "attn_output", config.out_bias)]
        if not config.n_experts:
            projections += [("mlp.gate_proj", "ffn_gate", config.mlp_bias),
                            ("mlp.up_proj", "ffn_up", config.mlp_bias),
                            ("mlp.down_proj", "ffn_down", config.mlp_bias)]
        else:
            pairs.append(("mlp.router.weight", "ffn_gate_inp.weight"))
        for a, b, has_bias in projections:
            pairs += [(f"{a}.weight", f"{b}.weight")] + ([(f"{a}.bias", f"{b}.bias")] if has_bias else [])
        if config.qk_norm:
            pairs += [("attn.q_norm.weight", "attn_q_norm.weight"),
                      ("attn.k_norm.weight", "attn_k_norm.weight")]
        names.update({ours + a: theirs + b for a, b in pairs})
    return names


# MoE experts: llama.cpp stacks the E experts of a block into one 3-D tensor per projection.
_EXPERT_PROJECTIONS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor in a `Transformer(config)` state dict that GGUF can hold."""
    d, hd, v = config.d_model, config.dim_per_head, config.vocab_size
    q_out, kv_out = config.n_heads * hd, config.kv_heads * hd
    per_layer = {
        "attn_norm.weight": (d,), "mlp_norm.weight": (d,),
        "attn.q_proj.weight": (q_out, d), "attn.k_proj.weight": (kv_out, d),
        "attn.v_proj.weight": (kv_out, d),
        "attn.o_proj.weight": (d, q_out), "attn.q_proj.bias": (q_out,), "attn.k_proj.bias": (kv_out,),
        "attn.v_proj.bias": (kv_out,), "attn.o_proj.bias": (d,), "attn.q_norm.weight": (hd,),
        "attn.k_norm.weight": (hd,), "mlp.router.weight": (config.n_experts, d),
    }
    mlp = {"gate_proj.weight": (config.d_ff, d), "up_proj.weight": (config.d_ff, d),
           "down_proj.weight": (d, config.d_ff), "gate_proj.bias": (config.d_ff,),
           "up_proj.bias": (config.d_ff,), "down_proj.bias": (d,)}
    shapes = {"embed.weight": (v, d), "final_norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(config.n_layers):
        shapes |= {f"blocks.{i}.{k}": s for k, s in per_layer.items()}
        shapes |= {f"blocks.{i}.mlp.{k}": s for k, s in mlp.items()}
        for e in range(config.n_experts):
            shapes |= {f"blocks.{i}.mlp.experts.{e}.{k}": s for k, s in mlp.items()}
    return shapes


def _permute_rows(w: np.ndarray, n_heads: int, *, to_gguf: bool) -> np.ndarray:
    """Reorder each head's rows between the rotate-half layout (lmforge) and llama.cpp's pairs.

    rotate-half: rows [x_0 .. x_{h/2-1}, y_0 .. y_{h/2-1}];  llama.cpp: [x_0, y_0, x_1, y_1, ...].
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    if to_gguf:
        return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rows_for_gguf(name: str, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    """`w`'s rows in llama.cpp's RoPE layout when `name` is (part of) W_q or W_k, else `w` as it is.

    A LoRA's B matrix of q_proj produces W_q's rows, so it is reordered the same way."""
    heads = _permuted_heads(name, config)
    return _permute_rows(w, heads, to_gguf=True) if heads else w


def _permuted_heads(name: str, config: ModelConfig) -> int | None:
    """How many heads to (un)permute a tensor by, or None when it is not W_q/W_k."""
    if ".attn.q_proj." in name:
        return config.n_heads
    if ".attn.k_proj." in name:
        return config.kv_heads
    return None


# The block types whose numbers an engine layer can hold as they are: w = step * code + offset with
# 4-bit codes and f16 steps/offsets per 32 (int4), or w = scale * code with int8 codes and an f16
# scale per 32 (int8). Anything else (K-quants, F16, ...) is dequantized.
KEEPABLE: dict[str, tuple[GGMLType, ...]] = {"int4": (GGMLType.Q4_0, GGMLType.Q4_1), "int8": (GGMLType.Q8_0,)}


@dataclass
class GGUFModel:
    """A GGUF read for lmforge: `state` holds float32 tensors, `blocks` the matrices kept in their
    integers (`read_gguf_model(keep=...)`), both under lmforge's names with rows in lmforge's order."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    blocks: dict[str, KeptBlocks]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class KeptBlocks:
    """A matrix's quantized numbers, nothing rounded: int4 holds (codes uint8 [out, in] in 0..15,
    step, offset f32 [out, in / 32]); int8 holds (codes int8 [out, in], scale f32 [out, in / 32])."""

    kind: Literal["int4", "int8"]
    parts: tuple[np.ndarray, ...]


def load_gguf_model(
    path: str | os.PathLike[str],
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a llama/qwen2 GGUF into (config, float32 state dict for `Transformer`, metadata).

    Every tensor is dequantized to float32. A tensor lmforge has no place for, or a
    hyperparameter it cannot express, is an error rather than silently dropped.
    """
    model = read_gguf_model(path)
    return model.config, model.state, model.metadata


def read_gguf_model(path: str | os.PathLike[str], *, keep: Collection[str] = ()) -> GGUFModel:
    """Read a llama/qwen2 GGUF once: every tensor dequantized to float32, except the projection
    matrices (and the LM head) stored in a block type of the `keep` kinds ("int4": Q4_0/Q4_1,
    "int8": Q8_0), which come back as their codes and scales (`KeptBlocks`) without a float
    copy. A tied embedding in such a type is both: its blocks make the LM head, its float
    rows the lookup table. A tensor lmforge has no place for, or a hyperparameter it cannot
    express, is an error rather than silently dropped."""
    gguf = GGUFFile(path)
    config = config_from_gguf(gguf.metadata, gguf.tensors)
    arch = ARCHITECTURES[config.extra["gguf"]["architecture"]]
    shapes = expected_shapes(config)
    keep_types = {t: kind for kind in keep for t in KEEPABLE[kind]}
    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, KeptBlocks] = {}
    used: set[str] = set()

    def check(theirs: str, shape: tuple[int, ...]) -> TensorInfo:
        if theirs not in gguf.tensors:
            raise GGUFError(f"{path}: missing tensor {theirs!r}")
        if gguf.tensors[theirs].shape != shape:
            raise GGUFError(f"{path}: tensor {theirs!r} has shape {gguf.tensors[theirs].shape}, "
                            f"the metadata implies {shape}")
        used.add(theirs)
        return gguf.tensors[theirs]

    def fetch(theirs: str, shape: tuple[int, ...]) -> np.ndarray:
        check(theirs, shape)
        return gguf.tensor(theirs)

    def unpermute(ours: str, w: np.ndarray) -> np.ndarray:
        heads = _permuted_heads(ours, config)
        return _permute_rows(w, heads, to_gguf=False) if arch.permute_qk and heads else w

    for ours, theirs in tensor_names(config).items():
        info = check(theirs, shapes[ours])
        head = "lm_head.weight" if ours == "embed.weight" and config.tie_embeddings else None
        if info.ggml_type in keep_types and (_is_projection(ours) or head):
            kept = _kept_blocks(gguf.raw(theirs), info, keep_types[info.ggml_type])
            blocks[head or ours] = KeptBlocks(kept.kind, tuple(unpermute(ours, p) for p in kept.parts))
            if not head:
                continue
        state[ours] = _to_torch(unpermute(ours, gguf.tensor(theirs)))
    for i in range(config.n_layers):
        for proj, stacked in _EXPERT_PROJECTIONS.items() if config.n_experts else ():
            for part in ("weight", "bias") if config.mlp_bias else ("weight",):
                one = shapes[f"blocks.{i}.mlp.{proj}.{part}"]
                w = fetch(f"blk.{i}.{stacked}.{part}", (config.n_experts, *one))
                for e in range(config.n_experts):
                    state[f"blocks.{i}.mlp.experts.{e}.{proj}.{part}"] = _to_torch(w[e])
    leftover = sorted(set(gguf.tensors) - used)
    if leftover:
        shown = ", ".join(leftover[:8]) + (f" and {len(leftover) - 8} more" if len(leftover) > 8 else "")
        raise GGUFError(f"{path}: lmforge has no place for these tensors: {shown}")
    return GGUFModel(config, state, blocks, dict(gguf.metadata))


def _is_projection(name: str) -> bool:
    """A linear layer's weight that an int layer can replace (not the embedding, a norm or a router)."""
    return name == "lm_head.weight" or (name.endswith("_proj.weight") and ".experts." not in name)


def _kept_blocks(raw: np.ndarray, info: TensorInfo, kind: str) -> KeptBlocks:
    rows, cols = info.shape
    if kind == "int4":
        return KeptBlocks("int4", decode_q4(raw, info.ggml_type, rows, cols))
    return KeptBlocks("int8", decode_q8_0(raw, rows, cols))


def _to_torch(w: np.ndarray) -> torch.Tensor:
    """A writable, contiguous copy only where needed (views of the file are read-only)."""
    return torch.from_numpy(np.require(w, dtype=np.float32, requirements=["C", "W"]))


# --------------------------------------------------------------------------- export

ExportDType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k"]
# llama.cpp's `llama_ftype`: ALL_F32, MOSTLY_F16, MOSTLY_BF16, MOSTLY_Q8_0, MOSTLY_Q4_0, MOSTLY_Q4_1,
# MOSTLY_Q4_K_S (llama.cpp's name for "Q4_K where the rows allow": what q4_k writes)
_FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q4_k": 14}
BLOCK_DTYPES = {"q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0, "q4_1": GGMLType.Q4_1, "q4_k": GGMLType.Q4_K}


def _check_exportable(config: ModelConfig) -> None:
    problems = []
    if config.position != "rope":
        problems.append(f"position={config.position!r} (llama needs rope)")
    if config.norm != "rmsnorm":
        problems.append(f"norm={config.norm!r} (llama needs rmsnorm)")
    if config.mlp != "swiglu":
        problems.append(f"mlp={config.mlp!r} (llama needs swiglu)")
    if config.qk_norm:
        problems.append("qk_norm (llama has none)")
    if config.n_experts and config.mlp_bias:
        problems.append("mlp_bias with experts (llama's experts have no biases)")
    if config.rope_scaling and config.rope_scaling.get("type") != "linear":
        problems.append(f"rope_scaling type {config.rope_scaling.get('type')!r} (only linear is exported)")
    if problems:
        raise GGUFError("cannot export as a llama GGUF: " + "; ".join(problems))


def gguf_hyperparameters(config: ModelConfig) -> dict[str, Any]:
    """The `llama.*` keys llama.cpp reads for this config."""
    hp: dict[str, Any] = {
        "llama.vocab_size": config.vocab_size,
        "llama.context_length": config.max_seq_len,
        "llama.embedding_length": config.d_model,
        "llama.block_count": config.n_layers,
        "llama.feed_forward_length": config.d_ff,
        "llama.rope.dimension_count": config.dim_per_head,
        "llama.rope.freq_base": float(config.rope_theta),
        "llama.attention.head_count": config.n_heads,
        "llama.attention.head_count_kv": config.kv_heads,
        "llama.attention.layer_norm_rms_epsilon": float(config.norm_eps),
    }
    if config.dim_per_head != config.d_model // config.n_heads:
        hp["llama.attention.key_length"] = hp["llama.attention.value_length"] = config.dim_per_head
    if config.rope_scaling:
        hp["llama.rope.scaling.type"] = "linear"
        hp["llama.rope.scaling.factor"] = float(config.rope_scaling["factor"])
    if config.sliding_window:  # read back by lmforge; llama.cpp's llama graph ignores it
        hp["llama.attention.sliding_window"] = config.sliding_window
    if config.n_experts:
        hp["llama.expert_count"] = config.n_experts
        hp["llama.expert_used_count"] = config.n_experts_per_token
    return hp


def gguf_matrix_type(name: str, shape: tuple[int, ...], dtype: ExportDType) -> GGMLType:
    """The ggml type GGUF tensor `name` is written in for `dtype`.

    1-D tensors and MoE routers stay F32 (llama.cpp expects it). Under the 4-bit types the
    token embedding and the output head are Q8_0: the head decides every token and is the
    one matrix 4 bits hurts most (llama.cpp's own Q4 recipes keep it at 6 bits). A row
    length a type's blocks do not divide falls back, as llama.cpp's quantizer does: Q4_K
    (256 per block) to Q4_1, a 32-block type to F16."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight") or dtype == "f32":
        return GGMLType.F32
    if dtype in ("f16", "bf16"):
        return GGMLType[dtype.upper()]
    kind = BLOCK_DTYPES[dtype]
    if kind != GGMLType.Q8_0 and name in ("token_embd.weight", "output.weight"):
        kind = GGMLType.Q8_0
    if kind == GGMLType.Q4_K and shape[-1] % 256:
        kind = GGMLType.Q4_1
    return kind if shape[-1] % 32 == 0 else GGMLType.F16


def _encode_weight(name: str, w: np.ndarray, dtype: ExportDType) -> TensorData:
    kind = gguf_matrix_type(name, w.shape, dtype)
    if kind in QUANTIZERS:
        return TensorData(name, w.shape, kind, QUANTIZERS[kind](w))
    if kind == GGMLType.BF16:
        return TensorData(name, w.shape, kind, to_bf16(w))
    return TensorData(name, w.shape, kind, w.astype(np.float16 if kind == GGMLType.F16 else np.float32))


def export_gguf(
    path: str | os.PathLike[str],
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer_metadata: Mapping[str, Any],
    dtype: ExportDType = "f16",
    *,
    name: str | None = None,
    blocks: Mapping[str, tuple[GGMLType, np.ndarray]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a llama-architecture GGUF v3 that llama.cpp loads, atomically.

    `tokenizer_metadata` supplies the `tokenizer.*` keys (`Tokenizer.gguf_metadata()`).
    Matrices are stored as `dtype` (`gguf_matrix_type`: norms and other 1-D tensors stay F32,
    the embedding and head Q8_0 under the 4-bit types, rows a block does not divide fall
    back). `blocks` maps some of lmforge's tensor names to ready-made GGML blocks (rows in
    lmforge's order; a quantized model's own integers, `lmforge.export.gguf_plan`), written
    as they are; the state dict still holds those tensors in float, for the checks.
    `progress(done, total)` is called after each tensor is encoded.
    """
    if dtype not in _FILE_TYPES:
        raise GGUFError(f"dtype must be one of {', '.join(_FILE_TYPES)}, got {dtype!r}")
    _check_exportable(config)
    foreign = sorted(k for k in tokenizer_metadata if not k.startswith("tokenizer."))
    if foreign:
        raise GGUFError(f"tokenizer_metadata may only hold tokenizer.* keys, got: {', '.join(foreign)}")
    shapes = expected_shapes(config)
    names = tensor_names(config)
    expert_names = {f"blocks.{i}.mlp.experts.{e}.{proj}.{part}"
                    for i in range(config.n_layers) for e in range(config.n_experts)
                    for proj in _EXPERT_PROJECTIONS for part in ("weight", "bias")[:1 + config.mlp_bias]}
    extra = sorted(set(state_dict) - set(names) - expert_names)
    missing = sorted((set(names) | expert_names) - set(state_dict))
    if extra or missing:
        raise GGUFError(f"state dict does not match the config: missing {missing[:5]}, "
                        f"unexpected {extra[:5]}")

    def array(ours: str) -> np.ndarray:
        w = state_dict[ours].detach().to(device="cpu", dtype=torch.float32).numpy()
        if w.shape != shapes[ours]:
            raise GGUFError(f"{ours} has shape {tuple(w.shape)}, the config implies {shapes[ours]}")
        if not np.isfinite(w).all():
            raise GGUFError(f"{ours} contains NaN or infinite values")
        heads = _permuted_heads(ours, config)
        return _permute_rows(w, heads, to_gguf=True) if heads else w

    def tensor(ours: str, theirs: str) -> TensorData:
        if blocks is None or ours not in blocks:
            return _encode_weight(theirs, array(ours), dtype)
        kind, data = blocks[ours]
        array(ours)  # the checks: shape and finite values
        heads = _permuted_heads(ours, config)
        return TensorData(theirs, shapes[ours], kind,
                          _permute_rows(data, heads, to_gguf=True) if heads else data)

    stacked_parts = [(i, proj, stacked, part) for i in range(config.n_layers)
                     for proj, stacked in (_EXPERT_PROJECTIONS.items() if config.n_experts else ())
                     for part in ("weight", "bias")[:1 + config.mlp_bias]]
    total = len(names) + len(stacked_parts)
    tensors = []
    for ours, theirs in names.items():
        tensors.append(tensor(ours, theirs))
        if progress is not None:
            progress(len(tensors), total)
    for i, proj, stacked, part in stacked_parts:
        w = np.stack([array(f"blocks.{i}.mlp.experts.{e}.{proj}.{part}") for e in range(config.n_experts)])
        tensors.append(_encode_weight(f"blk.{i}.{stacked}.{part}", w, dtype))
        if progress is not None:
            progress(len(tensors), total)

    provenance = config.extra.get("gguf")
    gguf_name = provenance.get("name") if isinstance(provenance, dict) else None
    metadata: dict[str, Any] = {
        "general.architecture": "llama",
        "general.type": "model",
        "general.name": name or gguf_name or "lmforge model",
        "general.file_type": _FILE_TYPES[dtype],
    }
    if any(t.ggml_type not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) for t in tensors):
        metadata["general.quantization_version"] = 2  # ggml's block layouts since 2023, as llama.cpp writes
    metadata |= gguf_hyperparameters(config)
    metadata |= dict(tokenizer_metadata)
    return write_gguf(path, metadata, tensors)
