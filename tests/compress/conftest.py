"""Tiny Llama-style models with the activation outliers real LLMs have, and correlated inputs.

Compression methods earn their keep on structure: a few input channels with large
activations (AWQ, Wanda), and inputs whose channels are correlated (GPTQ, SparseGPT
spread an error across the channels that can absorb it). Random i.i.d. inputs have
neither, and on them the methods cannot beat rounding or magnitude, so the fixtures
build both in.
"""

from __future__ import annotations

import pytest
import torch
from tests.conftest import one_torch_thread

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

TINY_LM = dict(vocab_size=260, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128,
               position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, out_bias=False, mlp_bias=False,
               tie_embeddings=True)
OUTLIER_CHANNELS = (3, 17, 40)


def tiny_lm(seed: int = 0, **overrides) -> Transformer:
    """A tiny random Llama whose norms amplify three channels 8x (activation outliers)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**(TINY_LM | overrides))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
        for block in model.blocks:
            for norm in (block.attn_norm, block.mlp_norm):
                norm.weight[list(OUTLIER_CHANNELS)] *= 8.0
    return model.requires_grad_(False)


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """[tokens, features] activations: a few shared factors plus noise, and three outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features // 4, features, generator=g)
    factors = torch.randn(tokens, features // 4, generator=g) @ mixing
    x = factors + 0.3 * torch.randn(tokens, features, generator=g)
    x[:, [c % features for c in OUTLIER_CHANNELS]] *= 10.0
    return x


def engine_matches_forward(model: Transformer, prompt: list[int], steps: int) -> bool:
    """Whether the engine's greedy reply is what the model's own forward pass picks, token by token
    (the engine runs fused layers and the C kernels; the forward pass is the definition)."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    tokens = Engine(model).complete([prompt], SamplingParams(temperature=0, max_tokens=steps))[0].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return tokens == ids[len(prompt):]


@pytest.fixture
def calibration() -> torch.Tensor:
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))


one_thread = one_torch_thread("package")
