"""Causal self-attention: multi-head, grouped-query, sliding window, QK-norm, ALiBi.

Each token's vector is projected to a query, a key and a value per head. The query of
token i is compared with the keys of tokens j <= i (causal), the scores are softmaxed
and the values mixed accordingly. Grouped-query attention (GQA) shares each key/value
head among n_heads / n_kv_heads query heads, shrinking the KV cache by that factor.
The arithmetic itself is `F.scaled_dot_product_attention`, which dispatches to flash
attention on GPUs.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers.norms import RMSNorm
from lmforge.model.layers.rope import apply_rope


class KVCache(Protocol):
    """What the model needs from a KV cache (implementations live in `lmforge.infer`).

    Per forward pass the model asks for `key_positions` once (the absolute position of
    every key the new queries may attend to, -1 for empty slots), then calls `update`
    once per layer, and finally `advance` with the number of new tokens.
    """

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor: ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, positions: torch.Tensor) -> None: ...


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, S] boolean: may query i (at q_pos) see key j (at k_pos)? For cached decoding,
    where the cache holds one sequence per row in order."""
    q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
    allowed = (k <= q) & (k >= 0)
    if window is not None:
        allowed &= (q - k) < window
    return allowed


def packed_causal_mask(positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, T] boolean for a row that may pack several sequences (no cache).

    Wherever the positions do not continue (p[t] != p[t-1] + 1) a new sequence starts,
    and a token may only see earlier tokens of its own sequence: without this, packed
    documents would leak into each other and a restarted position would see the future.
    """
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    segment = starts.cumsum(dim=1)
    index = torch.arange(positions.shape[1], device=positions.device)
    allowed = (index[None, :] <= index[:, None])[None, None]
    allowed = allowed & (segment[:, None, :, None] == segment[:, None, None, :])
    if window is not None:
        allowed = allowed & ((index[:, None] - index[None, :]) < window)[None, None]
    return allowed


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.dim_per_head
        d = config.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=config.out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, d]; mask None means plain causal over exactly these T tokens."""
        B, T, _ = x.shape
        # head counts come from the projections' widths, not the config: under tensor parallelism
        # each rank holds a slice of the heads (lmforge.train.parallel.tensor)
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        if k.shape[1] != q.shape[1]:  # GQA: each KV head serves a group of query heads
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
