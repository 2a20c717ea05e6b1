"""SmoothQuant W8A8: the integer product, smoothing that changes nothing in float and much after
rounding, static scales, and the engine and the saved folder running exactly what was measured."""

import pytest
import torch

from lmforge.compress.grid import Grid, GridError
from lmforge.compress.layerwise import walk_blocks
from lmforge.compress.quantize import quantize_model
from lmforge.compress.smoothquant import fake_w8a8, search_alpha, smooth_block, smoothing_scales, w8a8_block
from lmforge.infer.quant import Int8ActLinear, Int8Linear, concat_linears, interleave_linears
from lmforge.infer.quantized_folder import load_quantized, save_quantized

from .conftest import correlated_inputs, engine_matches_forward, tiny_lm
from .test_quantize import HELD_OUT, logits_error


def w8a8_layer(activations="dynamic", act_scale=0.0, out_features=48, seed=0) -> Int8ActLinear:
    weight = torch.randn(out_features, 64, generator=torch.Generator().manual_seed(seed))
    q = Int8Linear.from_float(weight, torch.randn(out_features))
    return Int8ActLinear(q.qweight, q.scale, q.bias, activations=activations, act_scale=act_scale)


@pytest.mark.parametrize("rows", [1, 5, 40])  # the C kernel's sizes and BLAS's
def test_the_product_is_the_integer_dot_product_of_int8_activations_and_weights(rows):
    layer = w8a8_layer()
    x = correlated_inputs(rows, 64)
    x_scale = x.abs().amax(1, keepdim=True) / 127
    x_codes = torch.round(x / x_scale).clamp(-127, 127).to(torch.int64)
    exact = (x_codes @ layer.qweight.to(torch.int64).T).double() * x_scale.double() * layer.scale.double()
    expected = exact + layer.bias.double()
    assert torch.allclose(layer(x).double(), expected, rtol=1e-6, atol=1e-5)
    # ... and an approximation of the float layer, worse than weight-only int8 (activations rounded too)
    weight_only = Int8Linear(layer.qweight, layer.scale, layer.bias)
    reference = x @ layer.dequantize().T + layer.bias
    assert 0 < (layer(x) - reference).abs().max() < 0.05 * reference.abs().max()
    assert torch.allclose(weight_only(x), reference, atol=1e-4)


def test_static_scales_round_every_token_on_one_grid_and_clip_beyond_it():
    x = correlated_inputs(8, 64)
    act_scale = float(x.abs().max()) / 127
    static = w8a8_layer("static", act_scale)
    codes, scale = static.quantize_input(x)
    assert scale.numel() == 1 and float(scale) == pytest.approx(act_scale)
    assert codes.abs().max() == 127 and torch.equal(codes, codes.round())
    louder, _ = static.quantize_input(10 * x)
    assert louder.abs().max() == 127  # clipped, not wrapped
    with pytest.raises(ValueError, match="dynamic or static"):
        w8a8_layer("per-tensor")
    layer = w8a8_layer()
    with pytest.raises(ValueError, match="one weight scale per output row"):
        Int8ActLinear(layer.qweight, layer.scale[:, None].expand(-1, 2).contiguous())


def test_fused_projections_keep_rounding_their_shared_input():
    q, k = w8a8_layer("static", 0.1, 48, 0), w8a8_layer("static", 0.1, 48, 1)
    fused = concat_linears([q, k])
    assert isinstance(fused, Int8ActLinear) and fused.activations == "static"
    x = correlated_inputs(3, 64)
    assert torch.allclose(fused(x), torch.cat([q(x), k(x)], 1), atol=1e-6)
    interleaved = interleave_linears(q, k)
    assert torch.allclose(interleaved(x)[:, 0::2], q(x), atol=1e-6)
    with pytest.raises(TypeError, match="same way"):
        concat_linears([q, w8a8_layer("static", 0.2)])


def test_smoothing_leaves_the_float_block_unchanged_and_tames_the_outlier_channels(calibration):
    model, reference = tiny_lm(), tiny_lm()
    ranges = {}

    def visit(index, block, inputs):
        before = inputs["attn.q_proj"].abs_max.clone()
        smooth_block(block, inputs, 0.5)
        ranges[index] = before, inputs["attn.q_proj"].abs_max

    walk_blocks(model, calibration, visit, xtx=False)
    with torch.no_grad():
        assert torch.allclose(model(HELD_OUT).logits, reference(HELD_OUT).logits, atol=1e-4)
    before, after = ranges[0]
    spread = lambda r: float(r.max() / r.median())  # noqa: E731
    assert spread(after) < spread(before) / 2  # alpha 0.5: about the square root of the spread


def test_smoothing_makes_w8a8_lose_less_than_rounding_the_same_activations_unsmoothed(calibration):
    reference = tiny_lm()
    plain = tiny_lm()
    walk_blocks(plain, calibration, lambda i, block, inputs: w8a8_block(block, inputs, "dynamic"), xtx=False)
    errors = {"unsmoothed": logits_error(plain, reference)}
    for alpha in (0.5, None):
        model = tiny_lm()
        report = quantize_model(model, "smoothquant", Grid(8), calibration=calibration, head="none",
                                alpha=alpha)
        assert report.layers == 14 and report.details["activations"] == "dynamic"
        errors[alpha] = logits_error(model, reference)
    assert errors[0.5] < errors["unsmoothed"] / 2 and errors[None] <= errors[0.5] * 1.05, errors


def test_the_alpha_search_never_does_worse_than_the_papers_fixed_half():
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(256, 64)
    alpha, s = search_alpha(weight, x, x.abs().amax(0))
    reference = x @ weight.T

    def error(scales):
        return float((fake_w8a8(x / scales, weight * scales) - reference).square().mean())

    assert 0 <= alpha <= 1
    assert error(s) <= error(smoothing_scales(x.abs().amax(0), weight.abs().amax(0), 0.5))


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_the_engine_and_the_saved_folder_run_the_measured_model(activations, calibration, tmp_path):
    model = tiny_lm()
    quantize_model(model, "smoothquant", Grid(8), calibration=calibration, activations=activations)
    layers = [m for m in model.blocks.modules() if isinstance(m, Int8ActLinear)]
    assert len(layers) == 14 and all(m.activations == activations for m in layers)
    assert all((m.act_scale > 0) == (activations == "static") for m in layers)
    assert engine_matches_forward(model, [5, 80, 13, 200], 10)
    loaded = load_quantized(save_quantized(tmp_path / "w8a8", model))
    with torch.no_grad():
        assert torch.equal(loaded(HELD_OUT).logits, model(HELD_OUT).logits)


def test_smoothquant_is_refused_below_eight_bits_and_alpha_outside_its_range(calibration):
    with pytest.raises(GridError, match="8 bits"):
        quantize_model(tiny_lm(), "smoothquant", Grid(4, 32), calibration=calibration)
    with pytest.raises(GridError, match="alpha"):
        quantize_model(tiny_lm(), "smoothquant", Grid(8), calibration=calibration, alpha=1.5)
    with pytest.raises(GridError, match="calibration"):
        quantize_model(tiny_lm(), "smoothquant", Grid(8))
