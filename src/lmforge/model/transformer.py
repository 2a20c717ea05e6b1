"""`Transformer`: one decoder-only model class for GPT-2, Llama, Qwen2, Mistral and Mixtral.

tokens -> embedding (+ learned positions) -> n_layers x [norm -> attention -> add,
norm -> MLP or MoE -> add] -> final norm -> LM head -> logits over the vocabulary.
Everything that differs between families is a field of `ModelConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers.alibi import alibi_bias, alibi_slopes
from lmforge.model.layers.attention import Attention, KVCache, attention_mask, packed_causal_mask
from lmforge.model.layers.linear import Linear, linear
from lmforge.model.layers.mlp import MLP
from lmforge.model.layers.moe import MixtureOfExperts
from lmforge.model.layers.norms import make_norm
from lmforge.model.layers.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, vocab]
    aux_loss: torch.Tensor | None = None  # MoE load balancing, already scaled by its coefficient


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = make_norm(config)
        self.mlp = MixtureOfExperts(config) if config.n_experts else MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, mask, cache))
        mlp_out = self.mlp(self.mlp_norm(x))
        aux = None
        if isinstance(mlp_out, tuple):
            mlp_out, aux = mlp_out
        return x + self.resid_dropout(mlp_out), aux


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        if config.position == "learned":
            self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model)
        if config.position == "rope":
            self.rotary = RotaryEmbedding(config.dim_per_head, config.rope_theta, config.rope_scaling)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = make_norm(config)
        if not config.tie_embeddings:
            self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2L)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm gains
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.config.tie_embeddings else self.lm_head.weight

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        logits_for: str = "all",
        logits_at: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, T]; positions [B, T] (default 0..T-1, or after the cache's content).

        `logits_for="last"` computes the LM head for the final position only, which is
        all that decoding needs and saves a [T, vocab] matmul during prefill. `logits_at`
        (bool [B, T]) computes it only where True, logits [n, vocab] in row-major order:
        fine-tuning takes a loss on the assistant's tokens alone, and the head over a
        49,152-token vocabulary is a fifth of a small model's work per token.
        """
        B, T = input_ids.shape
        # Default positions are known to be 0..T-1 without looking at them, which keeps the
        # training hot path free of device-to-host syncs and lets SDPA use its causal kernel.
        plain_causal = positions is None
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required when a KV cache is given")
            last_position = T - 1
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            positions = positions.to(input_ids.device)
            last_position = int(positions.max()) if self.config.position == "learned" else 0
        if self.config.position == "learned" and last_position >= self.config.max_seq_len:
            raise ValueError(f"position {last_position} exceeds max_seq_len {self.config.max_seq_len}")

        x = self.embed(input_ids)
        if self.config.position == "learned":
            x = x + self.pos_embed(positions)
        x = self.embed_dropout(x)

        rope = self.rotary(positions) if self.config.position == "rope" else None
        mask = self._mask(positions, cache, x.dtype, plain_causal=plain_causal)

        aux_total = None
        for block in self.blocks:
            x, aux = block(x, rope, mask, cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None:
            cache.advance(positions)

        x = self.final_norm(x)
        if logits_for == "last":
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[logits_at]
        # an `lm_head` module wins even when embeddings are tied: inference may install a
        # quantized copy of the tied matrix there (lmforge.infer.quant.quantize_model)
        head = self._modules.get("lm_head")
        logits = head(x) if head is not None else linear(x, self.embed.weight)
        if aux_total is not None:
            aux_total = self.config.moe_aux_loss_coef * aux_total / self.config.n_layers
        return ModelOutput(logits=logits, aux_loss=aux_total)

    def _mask(
        self, positions: torch.Tensor, cache: KVCache | None, dtype: torch.dtype, *, plain_causal: bool
    ) -> torch.Tensor | None:
        """None lets SDPA use its fused causal kernel; otherwise a boolean or additive mask."""
        k_pos = cache.key_positions(positions) if cache is not None else positions
        if plain_causal and self.config.sliding_window is None and self.config.position != "alibi":
            return None
        if cache is None:
            allowed = packed_causal_mask(positions, self.config.sliding_window)
        else:
            allowed = attention_mask(positions, k_pos, self.config.sliding_window)
        if self.config.position != "alibi":
            return allowed
        bias = alibi_bias(alibi_slopes(self.config.n_heads), positions, k_pos)  # fp32 even in a bf16 model
        return bias.masked_fill(~allowed, float("-inf")).to(dtype)

    @classmethod
    def from_state_dict(
        cls,
        config: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        prepare: Callable[[Transformer], None] | None = None,
    ) -> Transformer:
        """A model holding exactly these tensors, without first drawing random weights.

        Building on the meta device skips initialisation (seconds for a 135M model, all
        of it thrown away); `assign=True` adopts the given tensors. The RoPE table is not
        part of the state, so it is computed afresh in fp32. `prepare(model)` runs on the
        empty model first, to put other layers in place (a quantized folder's int layers).
        """
        if dtype is not None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        with torch.device("meta"):
            model = cls(config)
            if prepare is not None:
                prepare(model)
        model.load_state_dict(state_dict, strict=True, assign=True)
        if config.position == "rope":
            model.rotary = RotaryEmbedding(config.dim_per_head, config.rope_theta, config.rope_scaling)
        return model.to(device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

