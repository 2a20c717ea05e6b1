"""`lmforge info`: what a model is, read from its files without loading the weights.

For a preset it also breaks the parameter count down by component, which is the
quickest way to see where a transformer's parameters live (embeddings dominate small
models; the MLPs dominate large ones).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from lmforge.model.config import ModelConfig, human_count, preset


def describe_config(config: ModelConfig) -> dict[str, Any]:
    c = config
    family = "llama-style" if c.position == "rope" and c.norm == "rmsnorm" else "gpt2-style"
    if c.n_experts:
        family += f", MoE {c.n_experts_per_token}-of-{c.n_experts}"
    attention = "multi-head" if c.kv_heads == c.n_heads else f"grouped-query ({c.kv_heads} KV heads)"
    if c.sliding_window:
        attention += f", sliding window {c.sliding_window}"
    return {
        "architecture": family,
        "parameters": f"{human_count(c.num_parameters())} ({c.num_parameters():,})",
        "layers": c.n_layers,
        "d_model": c.d_model,
        "heads": f"{c.n_heads} x {c.dim_per_head} dims, {attention}",
        "mlp": f"{c.mlp}, d_ff {c.d_ff}",
        "positions": c.position + (f" (theta {c.rope_theta:g})" if c.position == "rope" else ""),
        "norm": c.norm,
        "context_length": c.max_seq_len,
        "vocab_size": c.vocab_size,
        "tied_embeddings": c.tie_embeddings,
        "training_flops_per_token": f"{c.flops_per_token():.3g} at T={c.max_seq_len}",
    }


def parameter_breakdown(config: ModelConfig) -> dict[str, str]:
    """Parameters per component, counted on a real (meta-device) model."""
    import torch

    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    groups: Counter[str] = Counter()
    for name, p in model.named_parameters():
        if name.startswith(("embed.", "pos_embed.")):
            key = "embeddings" if name.startswith("embed.") else "position embeddings"
        elif ".attn." in name:
            key = "attention (q, k, v, o)"
        elif ".mlp." in name:
            key = "experts + router" if config.n_experts else "mlp"
        elif "norm" in name:
            key = "norms"
        else:
            key = "lm head"
        groups[key] += p.numel()
    total = sum(groups.values())
    return {k: f"{human_count(v)} ({100 * v / total:.1f}%)" for k, v in groups.most_common()}


def describe(spec: str) -> dict[str, Any]:
    """Information about a preset name (`preset:gpt2`), a checkpoint folder, a .gguf, or a sample."""
    if spec.startswith("preset:"):
        config = preset(spec.removeprefix("preset:"))
        return describe_config(config) | {"parameter_breakdown": parameter_breakdown(config)}

    from lmforge.hub import resolve_model_path

    path = resolve_model_path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return _describe_gguf(path)
    if path.is_dir():
        return _describe_folder(path)
    raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a .gguf file")


def _describe_gguf(path: Path) -> dict[str, Any]:
    from lmforge.formats.gguf import GGUFFile
    from lmforge.model.gguf import config_from_gguf

    gguf = GGUFFile(path)
    config = config_from_gguf(gguf.metadata, gguf.tensors)
    types = Counter(info.ggml_type.name for info in gguf.tensors.values())
    meta = gguf.metadata
    return {"path": str(path), "format": f"GGUF v{gguf.version}",
            "name": meta.get("general.name", "?")} | describe_config(config) | {
        "dtype": ", ".join(f"{t} x{n}" for t, n in types.most_common()),
        "tokenizer": _tokenizer_summary(meta),
        "chat_template": "yes" if meta.get("tokenizer.chat_template") else "no",
        "size": _size(path.stat().st_size),
    }


def _describe_folder(path: Path) -> dict[str, Any]:
    from lmforge.model.checkpoint import load_config, read_safetensors_header

    config = load_config(path)
    weights = sorted(path.glob("*.safetensors"))
    dtypes: Counter[str] = Counter()
    for file in weights:
        for tensor in read_safetensors_header(file).values():
            dtypes[tensor["dtype"]] += 1
    from lmforge.formats.strictjson import read_json

    hf_config = read_json(path / "config.json") if (path / "config.json").exists() else {}  # checked above
    return {"path": str(path), "format": "checkpoint folder (Hugging Face layout)",
            "hf_architecture": ", ".join(hf_config.get("architectures", ["?"]))} | describe_config(config) | {
        "dtype": ", ".join(f"{t} x{n}" for t, n in dtypes.most_common()) or "no weights found",
        "tokenizer": _tokenizer_summary(path),
        "size": _size(sum(f.stat().st_size for f in weights)),
    }


def _tokenizer_summary(source: Path | dict[str, Any]) -> str:
    """A folder's tokenizer files, or a GGUF's already-parsed metadata."""
    from lmforge.tokenizer import Tokenizer, load_tokenizer

    try:
        tok = Tokenizer.from_gguf_metadata(source) if isinstance(source, dict) else load_tokenizer(source)
    except (ValueError, OSError) as err:
        return f"none ({err})"
    return f"byte-level BPE, {tok.vocab_size:,} tokens, {len(tok.special_tokens)} special"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
