"""Weight-only int8/int4: the formats, the kernels against their PyTorch twins, whole models."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.infer import kernels
from lmforge.infer.cache import StaticKVCache
from lmforge.infer.quant import (
    Int4Linear,
    Int8Linear,
    concat_linears,
    interleave_linears,
    quantize_linear,
    quantize_model,
    weight_bytes,
)
from lmforge.infer.runner import ModelRunner

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"CPU kernels: {kernels.status()}")


def test_int8_is_per_channel_symmetric():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.logspace(-2, 1, 16)[:, None]  # rows of very different scales
    layer = Int8Linear.from_float(w)
    assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() == 127
    # each row's error is at most half a step of its own scale
    assert ((layer.dequantize() - w).abs() <= layer.scale[:, None] / 2 + 1e-6).all()


def test_int4_groups_use_their_own_range():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    w[:, :32] *= 100  # one group with large values must not spoil the others
    layer = Int4Linear.from_float(w, group_size=32)
    assert layer.packed.shape == (8, 64) and layer.packed.dtype == torch.uint8
    assert layer.unpack().max() <= 15
    err = (layer.dequantize() - w).abs().view(8, 4, 32).amax(-1)
    step = layer.dm[..., 0].float()
    assert (err <= step / 2 + 1e-3 * step + 1e-6).all()
    assert err[:, 1:].max() < err[:, 0].min() / 20  # the other groups keep a fine step
    # a Q4_1-style grid survives re-quantization exactly
    again = Int4Linear.from_float(layer.dequantize(), group_size=32)
    torch.testing.assert_close(again.dequantize(), layer.dequantize(), atol=1e-3, rtol=0)


SHAPES = [(96, 64), (37, 256), (200, 96), (40, 192)]
# int4 packs 64 inputs at a time: only the shapes whose inputs are a multiple of 64
MODE_SHAPES = [("int8", s) for s in SHAPES] + [("int4", s) for s in SHAPES if s[1] % 64 == 0]


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize(("mode", "shape"), MODE_SHAPES)
def test_kernels_match_the_dequantized_matmul(mode, rows, shape):
    out_features, in_features = shape
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features)
    layer = quantize_linear(linear, mode)
    x = torch.randn(rows, in_features)
    expected = F.linear(x, layer.dequantize(), layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)


@needs_kernels
def test_int4_larger_groups_and_batched_shapes():
    layer = Int4Linear.from_float(torch.randn(50, 256), group_size=128)
    x = torch.randn(2, 3, 256)  # any leading shape
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize()), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="group size"):
        Int4Linear.from_float(torch.randn(4, 96), group_size=64)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_layers_compute_the_same_numbers(mode):
    layers = [quantize_linear(torch.nn.Linear(64, n, bias=b), mode) for n, b in ((32, True), (16, False))]
    fused = concat_linears(layers)
    x = torch.randn(3, 64)
    torch.testing.assert_close(fused(x), torch.cat([m(x) for m in layers], dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_stays_close_and_reads_fewer_bytes(tiny, mode):
    model = tiny(d_model=64, d_ff=128)
    q = quantize_model(copy.deepcopy(model), mode)
    assert "lm_head" in q._modules  # a quantized copy of the tied embedding
    ids = torch.randint(0, 97, (1, 12))
    ref, got = model(ids).logits, q(ids).logits
    tolerance = 0.05 if mode == "int8" else 0.25
    assert (got - ref).abs().max() < tolerance * ref.abs().max()
    ratio = weight_bytes(q) / weight_bytes(model)
    assert ratio < (0.3 if mode == "int8" else 0.22)
    # the runner uses the quantized layers too, and agrees with the quantized model
    runner = ModelRunner(q)
    last = runner(ids, StaticKVCache.for_model(q, 1, 16))
    torch.testing.assert_close(last, got[:, -1], atol=1e-4, rtol=1e-4)


def test_weight_bytes_of_smollm2_fp32(smollm2):
    # every matrix once, the tied embedding as the LM head, norms: 538 MB
    assert weight_bytes(smollm2.model) == 538_060_032


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("variant_name", ["llama-gqa", "gpt2"])
def test_c_decode_layer_matches_the_pytorch_path_on_quantized_weights(tiny, mode, variant_name):
    q = quantize_model(tiny(variant_name, d_model=64, d_ff=128), mode)
    fast, slow = ModelRunner(q), ModelRunner(q, fast_decode=False)
    assert fast.fast and not slow.fast
    ids = torch.randint(0, 97, (2, 10))
    outputs = []
    for runner in (fast, slow):
        cache = StaticKVCache.for_model(q, 2, 16)
        steps = [runner(ids[:, :4], cache)] + [runner(ids[:, t:t + 1], cache) for t in range(4, 10)]
        outputs.append(torch.stack(steps))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("mode", ["f32", "int8", "int4"])
def test_kernels_split_over_threads_give_the_same_numbers(mode):
    torch.set_num_threads(2)  # the autouse fixture restores the count afterwards
    w = torch.randn(4096, 256)  # large enough for the kernels to use every thread
    x = torch.randn(3, 256)
    if mode == "f32":
        layer = kernels.weight(kernels.F32, w)
        expected = x @ w.t()
    else:
        q = quantize_linear(w, mode)
        layer = q.kernel_weight()
        expected = x @ q.dequantize().t()
    torch.testing.assert_close(kernels.linear(layer, x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_interleaved_gate_and_up_rows(mode):
    gate, up = torch.nn.Linear(64, 8), torch.nn.Linear(64, 8)
    if mode:
        gate, up = quantize_linear(gate, mode), quantize_linear(up, mode)
    fused = interleave_linears(gate, up)
    x = torch.randn(2, 64)
    out = fused(x)
    torch.testing.assert_close(out[:, 0::2], gate(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 1::2], up(x), atol=1e-5, rtol=1e-5)


def grouped_int8(out_features: int, in_features: int, seed: int = 0, bias: bool = True) -> Int8Linear:
    """int8 codes with a scale per 32 inputs, as GGUF's Q8_0 stores them (f16 scales)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (out_features, in_features), generator=g, dtype=torch.int8)
    scale = (torch.rand(out_features, in_features // 32, generator=g) * 0.02).half().float()
    return Int8Linear(codes, scale, torch.randn(out_features, generator=g) if bias else None)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 4, 16])
def test_int8_with_a_scale_per_32_inputs(rows):
    layer = grouped_int8(40, 192, seed=rows)
    assert layer.group_size == 32 and Int8Linear(layer.qweight, layer.scale[:, 0]).group_size == 192
    w = layer.qweight.float().view(40, 6, 32) * layer.scale[..., None]
    assert torch.equal(layer.dequantize(), w.view(40, 192))  # each 32 inputs scaled by their own scale
    x = torch.randn(rows, 192)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias), atol=1e-4, rtol=1e-4)
    # fused as the runner fuses q/k/v and gate/up
    other = grouped_int8(24, 192, seed=99, bias=False)
    torch.testing.assert_close(concat_linears([layer, other])(x), torch.cat([layer(x), other(x)], -1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(interleave_linears(layer, grouped_int8(40, 192, 7))(x)[:, 0::2], layer(x),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 32"):
        Int8Linear(layer.qweight, torch.ones(40, 12))  # groups of 16
