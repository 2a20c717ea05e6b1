"""`ModelConfig`: one description that spans GPT-2 and the Llama family.

Every architectural choice the curriculum names is a field here, so a reader can see
at a glance what makes GPT-2 different from Llama, Qwen2, Mistral or Mixtral.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

PositionKind = Literal["learned", "rope", "alibi", "none"]
NormKind = Literal["layernorm", "rmsnorm"]
MlpKind = Literal["gelu", "gelu_tanh", "swiglu", "relu2"]


class ConfigError(ValueError):
    """A model configuration that cannot describe a working transformer."""


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head); fewer: GQA
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 3072
    max_seq_len: int = 1024

    position: PositionKind = "learned"
    rope_theta: float = 10000.0
    # e.g. {"type": "linear", "factor": 4.0} or Llama 3.1's {"type": "llama3", ...}
    rope_scaling: dict[str, Any] | None = None

    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    mlp: MlpKind = "gelu_tanh"

    qkv_bias: bool = True  # GPT-2 and Qwen2 have biases on q, k, v
    out_bias: bool = True  # GPT-2 has a bias on the attention output projection
    mlp_bias: bool = True
    norm_bias: bool = True  # LayerNorm's additive bias; RMSNorm never has one

    sliding_window: int | None = None  # Mistral: each token sees this many keys
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3, OLMo2)

    n_experts: int = 0  # 0: dense MLP; > 0: Mixture of Experts in every block
    n_experts_per_token: int = 2
    moe_aux_loss_coef: float = 0.01

    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    extra: dict[str, Any] = field(default_factory=dict)  # provenance, never read by the model

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def validate(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(message)

        def positive_int(value: Any) -> bool:  # a bool is an int to Python, never a size to us
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        def positive_number(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
                and value > 0

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            need(positive_int(value), f"{name} must be a positive integer, got {value!r}")
        for name in ("n_kv_heads", "head_dim", "sliding_window"):
            value = getattr(self, name)
            need(value is None or positive_int(value),
                 f"{name} must be a positive integer or unset, got {value!r}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            need(positive_number(getattr(self, name)),
                 f"{name} must be a positive finite number, got {getattr(self, name)!r}")
        need(isinstance(self.dropout, int | float) and 0 <= self.dropout < 1,
             f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("qkv_bias", "out_bias", "mlp_bias", "norm_bias", "qk_norm", "tie_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        need(self.rope_scaling is None or isinstance(self.rope_scaling, dict),
             f"rope_scaling must be a mapping or unset, got {self.rope_scaling!r}")
        need(self.position in ("learned", "rope", "alibi", "none"),
             f"position must be learned, rope, alibi or none, got {self.position!r}")
        need(self.norm in ("layernorm", "rmsnorm"), f"norm must be layernorm or rmsnorm, got {self.norm!r}")
        need(self.mlp in ("gelu", "gelu_tanh", "swiglu", "relu2"),
             f"mlp must be gelu, gelu_tanh, swiglu or relu2, got {self.mlp!r}")
        need(self.head_dim is not None or self.d_model % self.n_heads == 0,
             f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or set head_dim")
        need(self.n_heads % self.kv_heads == 0,
             f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        need(self.position != "rope" or self.dim_per_head % 2 == 0, "RoPE needs an even head_dim")
        need(self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive")
        if self.n_experts:
            need(0 < self.n_experts_per_token <= self.n_experts,
                 f"n_experts_per_token ({self.n_experts_per_token}) must be in 1..{self.n_experts}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            need(kind in ("linear", "llama3"),
                 f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)")

    # ------------------------------------------------------------------ estimates
    def num_parameters(self, *, include_embeddings: bool = True) -> int:
        """Exact parameter count of the `Transformer` this config builds."""
        d, hd = self.d_model, self.dim_per_head
        q_out, kv_out = self.n_heads * hd, self.kv_heads * hd
        norm_params = d * (2 if self.norm == "layernorm" and self.norm_bias else 1)
        attn = d * (q_out + 2 * kv_out) + q_out * d
        attn += (q_out + 2 * kv_out) * self.qkv_bias + d * self.out_bias
        attn += 2 * hd * self.qk_norm
        mlp_in = 2 if self.mlp == "swiglu" else 1
        one_mlp = mlp_in * d * self.d_ff + self.d_ff * d
        one_mlp += (mlp_in * self.d_ff + d) * self.mlp_bias
        mlp = one_mlp * self.n_experts + d * self.n_experts if self.n_experts else one_mlp
        block = attn + mlp + 2 * norm_params
        total = self.n_layers * block + norm_params
        if include_embeddings:
            total += self.vocab_size * d
            total += 0 if self.tie_embeddings else self.vocab_size * d
            total += self.max_seq_len * d if self.position == "learned" else 0
        return total

    def active_parameters(self) -> int:
        """Parameters touched per token (MoE uses only k of its experts)."""
        if not self.n_experts:
            return self.num_parameters()
        unused = self.n_experts - self.n_experts_per_token
        mlp_in = 2 if self.mlp == "swiglu" else 1
        one_mlp = mlp_in * self.d_model * self.d_ff + self.d_ff * self.d_model
        one_mlp += (mlp_in * self.d_ff + self.d_model) * self.mlp_bias
        return self.num_parameters() - self.n_layers * unused * one_mlp

    def flops_per_token(self, seq_len: int | None = None, *, training: bool = True) -> float:
        """FLOPs per token: 2N forward (+4N backward) for the matmuls, plus attention.

        N counts the non-embedding weights a token multiplies by, including the LM head;
        attention adds 2 * n_layers * seq_len * (n_heads * head_dim) * 2 (scores and
        values), following the PaLM appendix. The usual shorthand is 6N per token.
        """
        seq_len = seq_len or self.max_seq_len
        embedding_tables = 1 if self.tie_embeddings else 2
        matmul_params = self.active_parameters() - self.vocab_size * self.d_model * embedding_tables
        matmul_params -= self.max_seq_len * self.d_model if self.position == "learned" else 0
        matmul_params += self.vocab_size * self.d_model  # the LM head is a matmul
        window = min(seq_len, self.sliding_window or seq_len)
        attention = 2 * 2 * self.n_layers * window * self.n_heads * self.dim_per_head
        forward = 2 * matmul_params + attention
        return 3 * forward if training else forward

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**values)


def _gpt2(d_model: int, n_layers: int, n_heads: int, **overrides: Any) -> ModelConfig:
    return ModelConfig(vocab_size=50257, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       d_ff=4 * d_model, max_seq_len=1024, **overrides)


def _llama(**values: Any) -> ModelConfig:
    defaults: dict[str, Any] = dict(position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False,
                                    out_bias=False, mlp_bias=False, norm_bias=False, norm_eps=1e-5)
    return ModelConfig(**(defaults | values))


PRESETS: dict[str, Any] = {
    "gpt2": lambda: _gpt2(768, 12, 12),
    "gpt2-medium": lambda: _gpt2(1024, 24, 16),
    # A llama-style model small enough to train on a laptop CPU in minutes.
    "llama-tiny": lambda: _llama(vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4,
                                 d_ff=688, max_seq_len=512, tie_embeddings=True),
    "llama-mini": lambda: _llama(vocab_size=16384, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4,
                                 d_ff=1376, max_seq_len=1024, tie_embeddings=True),
    "smollm2-135m": lambda: _llama(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                   d_ff=1536, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True),
}


def preset(name: str) -> ModelConfig:
    """A named architecture (`lmforge info` lists them); unknown names are a clear error."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n)) if float(n).is_integer() else f"{n:.3g}"

