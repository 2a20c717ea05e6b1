"""The `Transformer` itself: shapes, parameter counts, causality, attention variants, MoE, precision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.config import PRESETS, ModelConfig, preset
from lmforge.model.layers.alibi import alibi_slopes
from lmforge.model.layers.rope import apply_rope
from lmforge.model.transformer import Transformer

VOCAB = 97
BASE = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, out_bias=False, mlp_bias=False,
             norm_bias=False)
CONFIGS = {
    "learned": {},
    "rope": LLAMA | {"n_kv_heads": 2},
    "alibi": {"position": "alibi"},
    "sliding-window": LLAMA | {"sliding_window": 3},
    "moe": LLAMA | {"n_experts": 4, "n_experts_per_token": 2},
}


def _model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**(BASE | overrides))).eval()
    with torch.no_grad():  # off the trivial init, so biases and norm gains matter too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model: Transformer, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


# ---------------------------------------------------------------------------------- shapes and counts
@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_shapes_and_last_position_logits(name):
    model, ids = _model(**CONFIGS[name]), _ids()
    out = model(ids)
    assert out.logits.shape == (2, 12, VOCAB)
    assert (out.aux_loss is not None) == (name == "moe")
    last = _logits(model, ids, logits_for="last")
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, out.logits[:, -1:].detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_the_formula(name):
    config = preset(name)
    with torch.device("meta"):  # shapes only: even the larger presets cost no memory
        model = Transformer(config)
    assert model.num_parameters() == config.num_parameters()


def test_gpt2_preset_has_gpt2s_parameter_count():
    assert preset("gpt2").num_parameters() == 124_439_808


@pytest.mark.parametrize("overrides", [
    {}, LLAMA, LLAMA | {"n_kv_heads": 1, "tie_embeddings": False}, LLAMA | {"qk_norm": True},
    LLAMA | {"head_dim": 16}, {"norm_bias": False, "mlp": "relu2"}, {"position": "alibi", "mlp": "gelu"},
    LLAMA | {"n_experts": 3, "n_experts_per_token": 1, "mlp_bias": True},
])
def test_parameter_count_formula_for_variants(overrides):
    model = Transformer(ModelConfig(**(BASE | overrides)))
    assert model.num_parameters() == model.config.num_parameters()


# ---------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("name", list(CONFIGS))
def test_causal_a_future_token_never_changes_earlier_logits(name):
    model, ids = _model(**CONFIGS[name]), _ids()
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    a, b = _logits(model, ids), _logits(model, changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-5)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


def _reference_logits(model: Transformer, ids: torch.Tensor, window: int | None) -> torch.Tensor:
    """The model's forward with attention spelled out token by token: query i sees keys i-window+1..i."""
    c = model.config
    B, T = ids.shape
    H, KV, hd = c.n_heads, c.kv_heads, c.dim_per_head
    cos, sin = model.rotary(torch.arange(T).expand(B, T))
    x = model.embed(ids)
    for block in model.blocks:
        attn, h = block.attn, block.attn_norm(x)
        q = apply_rope(attn.q_proj(h).view(B, T, H, hd).transpose(1, 2), cos, sin)
        k = apply_rope(attn.k_proj(h).view(B, T, KV, hd).transpose(1, 2), cos, sin)
        v = attn.v_proj(h).view(B, T, KV, hd).transpose(1, 2)
        out = torch.zeros(B, H, T, hd)
        for head in range(H):
            kv = head // (H // KV)  # grouped-query: consecutive query heads share one KV head
            for i in range(T):
                first = 0 if window is None else max(0, i - window + 1)
                scores = k[:, kv, first: i + 1] @ q[:, head, i, :, None] / math.sqrt(hd)  # [B, keys, 1]
                out[:, head, i] = (scores.softmax(dim=1) * v[:, kv, first: i + 1]).sum(dim=1)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, H * hd))
        x = x + block.mlp(block.mlp_norm(x))
    return model.final_norm(x) @ model.head_weight.t()


def test_sliding_window_matches_an_explicit_reference():
    model, ids = _model(**LLAMA | {"n_kv_heads": 2, "sliding_window": 3}), _ids()
    with torch.no_grad():
        windowed = _reference_logits(model, ids, window=3)
        full = _reference_logits(model, ids, window=None)
    torch.testing.assert_close(_logits(model, ids), windowed, rtol=0, atol=1e-5)
    assert (windowed - full).abs().max() > 1e-3  # the window really restricts what is seen
    unwindowed = Transformer(ModelConfig(**(BASE | LLAMA | {"n_kv_heads": 2}))).eval()
    unwindowed.load_state_dict(model.state_dict())
    torch.testing.assert_close(_logits(unwindowed, ids), full, rtol=0, atol=1e-5)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_weights():
    gqa = _model(**LLAMA | {"n_kv_heads": 2})
    mha = Transformer(ModelConfig(**(BASE | LLAMA))).eval()
    group, hd = 2, 8
    state = gqa.state_dict()
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            kv_heads = tensor.view(2, hd, -1)
            state[name] = kv_heads.repeat_interleave(group, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    ids = _ids()
    torch.testing.assert_close(_logits(mha, ids), _logits(gqa, ids), rtol=0, atol=1e-5)


def test_alibi_slopes():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-k for k in range(1, 9)]))
    twelve = alibi_slopes(12)  # not a power of two: 8 geometric slopes + 4 interleaved from 16
    torch.testing.assert_close(twelve[:8], alibi_slopes(8))
    torch.testing.assert_close(twelve[8:], alibi_slopes(16)[0::2][:4])


def test_learned_positions_beyond_max_seq_len_are_an_error():
    model = _model()
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(_ids(length=BASE["max_seq_len"] + 1))


# ---------------------------------------------------------------------------------- MoE
def test_moe_aux_loss_is_k_for_uniform_routing():
    model = _model(**CONFIGS["moe"])
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.router.weight.zero_()  # every expert equally likely
    out = model(_ids())
    coef = model.config.moe_aux_loss_coef
    k = model.config.n_experts_per_token  # transformers' Mixtral convention
    assert out.aux_loss.item() / coef == pytest.approx(k, abs=1e-6)


def test_moe_gradients_reach_the_router_from_both_losses():
    model = _model(**CONFIGS["moe"]).train()
    ids = _ids()
    out = model(ids)
    out.aux_loss.backward(retain_graph=True)
    for block in model.blocks:
        grad = block.mlp.router.weight.grad
        assert grad is not None and grad.abs().sum() > 0  # the balancing loss alone moves the router
        block.mlp.router.weight.grad = None
    F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for block in model.blocks:  # ... and so does the LM loss, through the mixing weights
        assert block.mlp.router.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- training and precision
@pytest.mark.parametrize("name", ["learned", "rope", "moe"])
def test_backward_reaches_every_parameter(name):
    model = _model(**CONFIGS[name]).train()
    ids = _ids()
    out = model(ids)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["learned", "rope", "alibi", "sliding-window"])
def test_bf16_forward_on_cpu(name):
    model, ids = _model(**CONFIGS[name]), _ids()
    reference = _logits(model, ids)
    model.to(torch.bfloat16)
    logits = _logits(model, ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max() + 0.02


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    """A bf16 inverse frequency is off by ~0.2%, which at position 4000 is a rotation off by radians."""
    model = _model(**CONFIGS["rope"])
    positions = torch.arange(4000).expand(1, 4000)
    cos32, _ = model.rotary(positions)
    model.to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    assert model.embed.weight.dtype == torch.bfloat16
    cos16, _ = model.rotary(positions)
    torch.testing.assert_close(cos16, cos32)


@pytest.mark.parametrize("name", ["learned", "rope", "alibi", "sliding-window"])
def test_packed_rows_keep_sequences_apart(name):
    """Positions that restart inside a row start a new sequence that cannot see the previous one."""
    model = _model(**CONFIGS[name])
    ids = _ids(batch=1, length=10)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    packed = model(ids, positions).logits
    first = model(ids[:, :4]).logits
    second = model(ids[:, 4:]).logits
    torch.testing.assert_close(packed[:, :4], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 4:], second, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["learned", "rope", "alibi", "moe"])
def test_from_state_dict_equals_the_original_model(name):
    """Building on the meta device and adopting the tensors gives the very same model."""
    model = _model(**CONFIGS[name]).eval()
    rebuilt = Transformer.from_state_dict(model.config, model.state_dict()).eval()
    ids = _ids()
    torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, atol=0, rtol=0)
    half = Transformer.from_state_dict(model.config, model.state_dict(), dtype=torch.bfloat16)
    assert half.embed.weight.dtype == torch.bfloat16
    if name == "rope":
        assert half.rotary.inv_freq.dtype == torch.float32 and not half.rotary.inv_freq.is_meta
    with pytest.raises(RuntimeError, match="Missing key"):
        Transformer.from_state_dict(model.config, {})


def test_explicit_arange_positions_give_the_default_logits():
    model = _model(**CONFIGS["rope"]).eval()
    ids = _ids()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    torch.testing.assert_close(model(ids, positions).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
