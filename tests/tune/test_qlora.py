"""QLoRA's base layers: the NF4 weight is what is stored, also between forward and backward."""

from __future__ import annotations

import torch

from lmforge.tune.qlora import NF4Linear

from .conftest import tiny_llama


def test_nf4_linear_computes_with_the_dequantized_weight_and_its_gradient():
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 64)
    layer = NF4Linear(dense)
    x = torch.randn(3, 128, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    y.square().sum().backward()
    want = 2 * y.detach() @ layer.weight
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-5)


def test_the_backward_pass_keeps_no_dequantized_weight():
    """Autograd would save each layer's fp32 weight for backward; QLoRA's point is not to hold it."""
    model = tiny_llama()
    from lmforge.tune.lora import LoRAConfig
    from lmforge.tune.qlora import add_qlora

    add_qlora(model, LoRAConfig(r=4, dropout=0.0))
    weight_shapes = {shape for m in model.modules() if isinstance(m, NF4Linear)
                     for shape in ((m.out_features, m.in_features), (m.in_features, m.out_features))}
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        model(torch.randint(0, 96, (1, 16))).logits.sum().backward()
    assert saved and not weight_shapes & set(saved)
