"""Prefix tuning: learn keys and values that every token may attend to (Li & Liang 2021).

Attention mixes the values of the keys a query matches. Prefix tuning puts N trained
"virtual tokens" in front of every sequence, but not as tokens: in each layer l it
prepends N trained key and value vectors P_k^l, P_v^l to the ones the real tokens make,

    attn(q, [P_k^l; K], [P_v^l; V])      for every query q of every layer l,

and trains only those, n_layers x 2 x N x kv_heads x head_dim numbers (for SmolLM2-135M
at N = 20: 30 x 2 x 20 x 192 = 230,400). The frozen model is steered through what it
attends to, with no change to any weight.

- **Through the KV cache.** Prepending keys and values to a layer's own is what a KV
  cache does for a sequence's past, so the prefix *is* a cache that already holds N
  tokens: `PrefixCache` implements the model's `KVCache` protocol (key_positions,
  update, advance) with the prefix in front. The prefix keys are stored as they are:
  they never pass through RoPE (transformers + peft do the same). The real tokens then
  sit at positions N, N+1, ..., as they would after N cached tokens.
- **One example per row.** The cache's mask (`attention_mask`) assumes one sequence per
  row, so a row must not pack several examples (their positions would restart, and a
  later example would see an earlier one): fine-tune with `data.pack: false`
  (`PrefixConfig.validate(pack=...)` refuses packing, and a row whose positions restart
  is an error).
- **Initialisation** is PEFT's: `prompt_embeddings` ~ N(0, 1) (an `nn.Embedding`'s
  default). Unlike LoRA or (IA)^3 the model does not start as the base: N random keys
  and values join every attention from the first step (Li & Liang initialise from the
  activations of real words for stability; PEFT, whose format this is, does not).
- **PEFT's layout** (`PrefixTuningConfig`, `prefix_projection=False`): one tensor
  `prompt_embeddings` of shape (N, n_layers * 2 * kv_heads * head_dim); row n viewed as
  [n_layers, 2, kv_heads, head_dim] holds virtual token n's key (index 0) and value
  (index 1) in every layer. With grouped-query attention peft sizes the prefix for the
  KV heads (token_dim = kv_heads * head_dim), and so does lmforge.

How the prefix reaches the model: `add_prefix` registers the `PrefixTuning` module as
`model.prefix_tuning` (so its parameter is in the state dict and the optimizer sees it)
and a forward pre-hook on the model that hands `Transformer.forward` a `PrefixCache` and
positions shifted by N, so `model(ids)` and `model(ids, positions, cache)` both see the
prefix and the model's code needs no change. The inference engine bypasses `forward`
(`lmforge.infer.runner`): it reads `model.prefix_tuning.key_values()` and writes them
into each sequence's cache slot before the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmforge.model.layers.attention import KVCache
from lmforge.tune.lora import freeze

ATTRIBUTE = "prefix_tuning"  # where the prefix lives on the model (the inference runner reads it there)


class PrefixError(ValueError):
    """A prefix-tuning setting or input that cannot work (packed rows, a bad size)."""


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 20  # N: trained keys and values per layer in front of every sequence

    def validate(self, *, pack: bool = False) -> None:
        """`pack`: whether the fine-tuning data packs several examples per row (refused)."""
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int) \
                or self.num_virtual_tokens < 1:
            raise PrefixError(f"prefix.num_virtual_tokens must be a whole number >= 1, got "
                              f"{self.num_virtual_tokens!r}")
        if pack:
            raise PrefixError("prefix tuning needs one example per row: set data.pack: false (its cache mask "
                              "assumes one sequence per row, so packed examples would see each other)")


class PrefixTuning(nn.Module):
    """The trained keys and values: PEFT's `prompt_embeddings`, and the per-layer view of it."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, num_virtual_tokens: int, *,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.num_virtual_tokens = num_virtual_tokens
        self.prompt_embeddings = nn.Parameter(  # N(0, 1), as peft's nn.Embedding
            torch.randn(num_virtual_tokens, n_layers * 2 * kv_heads * head_dim, device=device))

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each [n_layers, kv_heads, N, head_dim]: row n is [layer, key|value, head, dim]."""
        N = self.num_virtual_tokens
        kv = self.prompt_embeddings.view(N, self.n_layers, 2, self.kv_heads, self.head_dim)
        kv = kv.permute(2, 1, 3, 0, 4)  # [key|value, layer, head, N, dim]
        return kv[0], kv[1]

    def extra_repr(self) -> str:
        return f"tokens={self.num_virtual_tokens}, layers={self.n_layers}, kv_heads={self.kv_heads}"


class PrefixCache:
    """A `KVCache` whose first N keys and values in every layer are the prefix, then `inner`'s (if any).

    The prefix keys sit at positions 0..N-1, so every query (at N or later) sees them.
    """

    def __init__(self, prefix: PrefixTuning, inner: KVCache | None = None) -> None:
        self.keys, self.values = prefix.key_values()
        self.inner = inner

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        B, N = positions.shape[0], self.keys.shape[2]
        own = torch.arange(N, device=positions.device).expand(B, N)
        rest = self.inner.key_positions(positions) if self.inner is not None else positions
        return torch.cat([own, rest], dim=1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner is not None:
            k, v = self.inner.update(layer, k, v)
        B = k.shape[0]
        pk = self.keys[layer].to(k.dtype).expand(B, -1, -1, -1)
        pv = self.values[layer].to(v.dtype).expand(B, -1, -1, -1)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)

    def advance(self, positions: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.advance(positions)


def _with_prefix(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook: `Transformer.forward(ids, positions, cache)` gets a `PrefixCache`, positions + N."""
    prefix: PrefixTuning = getattr(model, ATTRIBUTE)
    names = ("input_ids", "positions", "cache")
    call = dict(zip(names, args)) | kwargs
    input_ids, positions, cache = call["input_ids"], call.get("positions"), call.get("cache")
    B, T = input_ids.shape
    if positions is None:
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
    elif cache is None and T > 1 and not bool((positions[:, 1:] == positions[:, :-1] + 1).all()):
        raise PrefixError("prefix tuning needs one sequence per row, but these positions restart (packed "
                          "examples): fine-tune with data.pack: false")
    call |= {"positions": positions.to(input_ids.device) + prefix.num_virtual_tokens,
             "cache": PrefixCache(prefix, cache)}
    return (), call


def add_prefix(model: nn.Module, config: PrefixConfig) -> list[str]:
    """Freeze `model` and give it a trainable prefix; the name of the trainable parameter."""
    config.validate()
    if hasattr(model, ATTRIBUTE):
        raise PrefixError("this model already has a prefix")
    freeze(model)
    cfg = model.config
    prefix = PrefixTuning(cfg.n_layers, cfg.kv_heads, cfg.dim_per_head, config.num_virtual_tokens,
                          device=model.embed.weight.device)
    model.add_module(ATTRIBUTE, prefix)
    model.register_forward_pre_hook(_with_prefix, with_kwargs=True)
    return [f"{ATTRIBUTE}.prompt_embeddings"]


def prefix_of(model: nn.Module) -> PrefixTuning | None:
    return getattr(model, ATTRIBUTE, None)
