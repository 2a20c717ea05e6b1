"""int8 activations: the C kernels' integer products (AVX2 and portable) against a PyTorch
reference of the same rounding, and the engine's fused decode with them against the PyTorch
per-layer path of the same quantized model."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer import kernels
from lmforge.infer.cache import StaticKVCache
from lmforge.infer.engine import Engine
from lmforge.infer.quant import Int4Linear, Int8ActLinear, Int8Linear, int8_activations, quantize_model
from lmforge.infer.runner import ModelRunner
from lmforge.infer.sampling import SamplingParams

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"CPU kernels: {kernels.status()}")


@pytest.fixture(params=["portable", "native"])
def kernel_isa(request, monkeypatch):
    """Each test once on the portable C build and once on the best this CPU has (AVX2 here); both
    builds stay in the kernel cache, so switching between them only loads a library."""
    if request.param == "portable":
        monkeypatch.setenv("LMFORGE_KERNEL_ISA", "portable")
    kernels.library.cache_clear()
    assert kernels.available(), kernels.status()
    yield kernels.isa()
    kernels.library.cache_clear()


def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    """The rounded input times the dequantized weight, in float64: what the integer kernel computes."""
    codes, scale = layer.quantize_input(x)
    y = (codes.double() * scale.double()) @ layer.dequantize().double().T
    return y if layer.bias is None else y + layer.bias.double()


def _layers(k: int, rounding: str) -> list:
    w, b = torch.randn(40, k), torch.randn(40)
    layers = [Int8Linear.from_float(w, b),  # one scale per row (k = 200: a tail after the 32-byte steps)
              Int8ActLinear(Int8Linear.from_float(w).qweight, Int8Linear.from_float(w).scale, b,
                            activations="static", act_scale=0.02)]  # clips the input's outliers
    if k % 64 == 0:  # int4 with each kind of group: 32 (two per 64 inputs), 64 (whole), 96 (sometimes split)
        layers += [Int4Linear.from_float(w, b, group) for group in (32, 64, 96) if k % group == 0]
        # a scale per 32 inputs, codes down to -128 (GGUF Q8_0)
        codes = torch.randint(-128, 128, (40, k), dtype=torch.int8)
        layers.append(Int8Linear(codes, torch.rand(40, k // 32) / 50))
    for layer in layers:
        if layer.activations is None:
            layer.activations = rounding
    return [m for m in layers if m.activations != "block" or k % 32 == 0]


@needs_kernels
@pytest.mark.parametrize("rounding", ["dynamic", "block"])  # a scale per token, per 32 inputs
@pytest.mark.parametrize("k", [200, 192, 576])
def test_integer_products_equal_the_rounded_reference(kernel_isa, k, rounding):
    torch.manual_seed(k)
    x = torch.randn(5, k) * torch.rand(k) * 3  # 5 rows: a tile of 4 and a tile of 1
    for layer in _layers(k, rounding):
        for rows in (1, 5):
            y = kernels.linear(layer.kernel_weight(layer.bias), x[:rows].contiguous())
            expected = _reference(layer, x[:rows])
            # exact integer sums: only the fp32 additions of the per-group terms differ
            assert (y.double() - expected).abs().max() <= 2e-6 * expected.abs().max(), (kernel_isa, layer)
        # and the rounding is real: weight-only products differ by far more
        layer.activations = None
        assert (kernels.linear(layer.kernel_weight(layer.bias), x) - y).abs().max() > 1e-4 * y.abs().max()


@needs_kernels
@pytest.mark.parametrize("scales", ["block", "token"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_decode_with_int8_activations_equals_the_pytorch_path(kernel_isa, tiny, monkeypatch, mode,
                                                                    scales):
    model = quantize_model(tiny("llama-gqa", d_model=64, d_ff=128), mode)
    assert int8_activations(model, scales) == 2 * 7 + 1  # every projection of both layers, and the head
    fast = ModelRunner(model)
    assert fast.fast
    ids = torch.randint(0, 97, (2, 12))
    fast_out = _decode(fast, model, ids)
    monkeypatch.setattr(kernels, "available", lambda: False)  # every layer in PyTorch: fake-quantized input
    slow = ModelRunner(model, fast_decode=False)
    slow_out = _decode(slow, model, ids)
    # an activation a hair from a rounding boundary may round the other way on one path: rare, small
    torch.testing.assert_close(fast_out, slow_out, atol=2e-3, rtol=2e-3)
    assert (fast_out.argmax(-1) == slow_out.argmax(-1)).all()


def _decode(runner: ModelRunner, model, ids: torch.Tensor) -> torch.Tensor:
    cache = StaticKVCache.for_model(model, ids.shape[0], 16)
    steps = [runner(ids[:, :4], cache)] + [runner(ids[:, t:t + 1], cache) for t in range(4, ids.shape[1])]
    return torch.stack(steps)


@needs_kernels
@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_w8a8_models_decode_through_the_fused_step(tiny, activations):
    model = tiny("llama-gqa", d_model=64, d_ff=128)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = Int8Linear.from_float(child.weight, child.bias)
                setattr(module, name, Int8ActLinear(q.qweight, q.scale, q.bias, activations=activations,
                                                    act_scale=0.05))
    runner = ModelRunner(model)
    assert runner.fast  # W8A8 used to fall back to the PyTorch path
    ids = torch.randint(0, 97, (1, 10))
    slow = ModelRunner(model, fast_decode=False)
    torch.testing.assert_close(_decode(runner, model, ids), _decode(slow, model, ids), atol=2e-3, rtol=2e-3)


@needs_kernels
def test_engine_option_greedy_tokens(tiny):
    model = quantize_model(tiny("llama-gqa", d_model=64, d_ff=128), "int4")
    prompt, params = [5, 17, 42, 8], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine = Engine(model, activations="int8")
    tokens = engine.complete([prompt], params)[0].token_ids
    assert all(m.activations == "block" for m in model.modules() if isinstance(m, Int4Linear))
    runner, cache = ModelRunner(model, fast_decode=False), StaticKVCache.for_model(model, 1, 32)
    expected, logits = [], runner(torch.tensor([prompt]), cache)
    for _ in range(12):
        expected.append(int(logits.argmax()))
        logits = runner(torch.tensor([[expected[-1]]]), cache)
    assert tokens == expected


def test_engine_option_needs_quantized_weights(tiny):
    with pytest.raises(ValueError, match="int8 activations need int8 or int4 weights"):
        Engine(tiny("llama-gqa"), activations="int8")
    with pytest.raises(ValueError, match="activations"):
        Engine(quantize_model(tiny("llama-gqa"), "int8"), activations="int4")
    with pytest.raises(ValueError, match="multiple of 32 inputs, one has 100"):
        Engine(quantize_model(tiny("llama-gqa", d_ff=100), "int8"), activations="int8")
    model = quantize_model(tiny("llama-gqa", d_ff=100), "int8")
    Engine(model, activations="int8-token")  # one scale per token: any width
    assert {m.activations for m in model.modules() if isinstance(m, Int8Linear)} == {"dynamic"}
