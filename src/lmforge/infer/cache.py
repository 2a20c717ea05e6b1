"""A preallocated key/value cache: attention over the past without recomputing it.

Without a cache, generating token n re-runs the model over all n previous tokens:
O(n^2) work for a whole reply. The keys and values of past tokens never change, so we
keep them, one [batch, kv_heads, max_len, head_dim] buffer per layer, and each decode
step computes only the new token's projections. Memory: 2 (K and V) x layers x
kv_heads x head_dim x max_len x bytes per value, for each sequence.
"""

from __future__ import annotations

import torch

from lmforge.model.config import ModelConfig


class StaticKVCache:
    """All sequences in the batch share one length (a batch that is prefilled together)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (config.n_layers, batch_size, config.kv_heads, max_len, config.dim_per_head)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> StaticKVCache:
        weight = next(model.parameters())
        return cls(model.config, batch_size, max_len, dtype=weight.dtype, device=weight.device)

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        new_tokens = positions.shape[1]
        if self.length + new_tokens > self.max_len:
            raise ValueError(f"KV cache is full: {self.length} + {new_tokens} tokens > {self.max_len}")
        total = self.length + new_tokens
        return torch.arange(total, device=positions.device).expand(positions.shape[0], total)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, positions: torch.Tensor) -> None:
        self.length += positions.shape[1]
