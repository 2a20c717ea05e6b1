"""`linear`: bf16 autocast on the fp32 GEMM computes what PyTorch's bf16 kernels compute.

The emulated path is forced on (as on a CPU without bf16 arithmetic) and compared with
PyTorch's own bf16 autocast kernels, forward and backward; the rare difference is one
bf16 rounding of a sum taken in another order.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.layers import linear as linear_module
from lmforge.model.layers.linear import Linear, bf16_through_fp32, linear
from lmforge.model.transformer import Transformer


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_module, "cpu_has_bf16_matmul", lambda: False)


@pytest.fixture
def native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_module, "cpu_has_bf16_matmul", lambda: True)


def _run(fn, x, w, b, upstream):
    for t in (x, w, b):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, w, b)
    (y.float() * upstream).sum().backward()
    return y.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone()


def _assert_bf16_equal(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.dtype == theirs.dtype, what
    same = (ours == theirs).float().mean().item()
    assert same >= 0.999, f"{what}: only {same:.4f} of the elements are identical"
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2**-7, atol=scale * 2**-7, msg=what)


@pytest.mark.parametrize("k", [96, 768])
def test_emulated_bf16_matches_bf16_autocast(emulated: None, k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(2, 64, k, generator=gen, requires_grad=True)
    w = (torch.randn(200, k, generator=gen) / k**0.5).requires_grad_()
    b = torch.randn(200, generator=gen, requires_grad=True)
    upstream = torch.randn(2, 64, 200, generator=gen)
    ours = _run(linear, x, w, b, upstream)
    theirs = _run(F.linear, x, w, b, upstream)
    assert ours[0].dtype == torch.bfloat16  # the output is bf16, as autocast's is
    assert ours[2].dtype == torch.float32  # the weight gradient reaches the fp32 master weight
    for name, a, c in zip(("output", "input grad", "weight grad", "bias grad"), ours, theirs):
        _assert_bf16_equal(a, c, name)


def test_plain_fp32_and_autocast_off_are_f_linear(emulated: None) -> None:
    x, w = torch.randn(3, 5, 8), torch.randn(4, 8)
    assert not bf16_through_fp32(x)
    assert torch.equal(linear(x, w), F.linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bf16_through_fp32(x)
        with torch.autocast("cpu", enabled=False):
            assert not bf16_through_fp32(x)


def test_linear_module_keeps_nn_linear_state(emulated: None) -> None:
    layer = Linear(8, 4)
    assert isinstance(layer, torch.nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def _model_step(model: Transformer, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids[:, :-1]).logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_transformer_bf16_step_same_either_way(monkeypatch: pytest.MonkeyPatch, family: str) -> None:
    """A whole model's bf16 loss and gradients: emulated (head, MLP) vs PyTorch's bf16 kernels."""
    extra = dict(position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, out_bias=False,
                 mlp_bias=False, norm_bias=False, n_kv_heads=2) if family == "llama" else {}
    config = ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=32, **extra)
    torch.manual_seed(0)
    model = Transformer(config)
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(linear_module, "cpu_has_bf16_matmul", lambda: True)
    loss_native, grads_native = _model_step(model, ids)
    monkeypatch.setattr(linear_module, "cpu_has_bf16_matmul", lambda: False)
    loss_ours, grads_ours = _model_step(model, ids)
    torch.testing.assert_close(loss_ours, loss_native, rtol=1e-3, atol=1e-3)
    for name, grad in grads_native.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads_ours[name], grad, rtol=0.05, atol=0.02 * scale, msg=name)
