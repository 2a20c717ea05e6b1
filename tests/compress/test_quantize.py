"""Quantizing whole models: the engine's layers everywhere, calibrated methods beat rounding, the
engine decodes the result exactly as its forward pass computes."""

import pytest
import torch

from lmforge.compress.grid import Grid, GridError
from lmforge.compress.prune import Sparsity, prune_model
from lmforge.compress.quantize import quantize_model
from lmforge.infer.quant import Int4Linear, Int8Linear, QuantizedLinear

from .conftest import engine_matches_forward, tiny_lm

HELD_OUT = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(99))


def logits_error(model, reference) -> float:
    with torch.no_grad():
        return float((model(HELD_OUT).logits - reference(HELD_OUT).logits).square().mean())


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_every_block_layer_becomes_an_engine_layer(method, calibration):
    model = tiny_lm()
    report = quantize_model(model, method, Grid(4, 32), calibration=calibration)
    kinds = (torch.nn.Linear, QuantizedLinear)
    linears = [m for b in model.blocks for m in b.modules() if isinstance(m, kinds)]
    assert len(linears) == report.layers == 14 and all(isinstance(m, Int4Linear) for m in linears)
    assert all(m.group_size == 32 for m in linears)
    assert isinstance(model.lm_head, Int8Linear)  # the tied head: an int8 copy of the embedding
    assert report.bytes_after < report.bytes_before / 3
    assert report.calibration_tokens == (0 if method == "rtn" else calibration.numel())


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_and_awq_lose_less_than_round_to_nearest_on_tokens_never_calibrated_on(bits, calibration):
    reference = tiny_lm()
    errors = {}
    for method in ("rtn", "gptq", "awq"):
        model = tiny_lm()
        quantize_model(model, method, Grid(bits, 32), calibration=calibration, head="none")
        errors[method] = logits_error(model, reference)
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"], errors


def test_the_engine_decodes_a_quantized_model_as_its_forward_pass_computes(calibration):
    model = tiny_lm()
    quantize_model(model, "gptq", Grid(4, 32), calibration=calibration)
    assert engine_matches_forward(model, [5, 80, 13, 200], 12)


def test_calibration_in_uneven_batches_and_experts_that_see_no_token(calibration):
    ten = torch.cat([calibration, calibration[:2]])  # batches of 8 and 2
    quantize_model(tiny_lm(), "gptq", Grid(4, 32), calibration=ten)
    moe = tiny_lm(n_experts=8, n_experts_per_token=1)
    one_token = calibration[:1, :2]  # two tokens reach at most two of the eight experts of a block
    report = quantize_model(moe, "gptq", Grid(4, 32), calibration=one_token)
    assert report.layers == 2 * (4 + 8 * 3)  # q, k, v, o and 8 experts' gate, up, down in each block
    assert len(report.details["loss"]) < report.layers  # the experts that saw nothing were rounded
    for method in ("wanda", "sparsegpt"):
        prune_model(tiny_lm(n_experts=8, n_experts_per_token=1), method, Sparsity(0.5), calibration=one_token)


def test_the_quantized_model_in_memory_is_the_one_saved(calibration):
    """With tied embeddings only the rounded head is saved; the lookup table follows it at once."""
    model = tiny_lm()
    quantize_model(model, "rtn", Grid(4, 32))
    assert torch.equal(model.embed.weight, model.lm_head.dequantize())


def test_models_that_cannot_be_quantized_are_refused_before_any_work(calibration):
    model = tiny_lm(d_ff=96)  # down_proj has 96 inputs: not a multiple of 64
    with pytest.raises(GridError, match="mlp.down_proj: a layer with 96 inputs"):
        quantize_model(model, "rtn", Grid(4, 32))
    model = tiny_lm()
    quantize_model(model, "rtn", Grid(8))
    with pytest.raises(GridError, match="already quantized"):
        quantize_model(model, "rtn", Grid(4, 32))
    with pytest.raises(GridError, match="calibration"):
        quantize_model(tiny_lm(), "gptq", Grid(4, 32))


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_pruning_a_model_with_data_keeps_more_of_it_than_magnitude(pattern, calibration):
    reference = tiny_lm()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = tiny_lm()
        report = prune_model(model, method, Sparsity.parse(pattern), calibration=calibration)
        assert report.zeros / report.weights == pytest.approx(0.5, abs=0.01)
        assert (model.embed.weight != 0).all()  # embeddings (and the tied head) untouched
        errors[method] = logits_error(model, reference)
    assert errors["wanda"] < errors["magnitude"] and errors["sparsegpt"] < errors["magnitude"], errors


def test_true_sequential_gptq_calibrates_later_layers_on_the_rounded_earlier_ones(calibration, monkeypatch):
    import lmforge.compress.quantize as quantize

    seen: dict[tuple[bool, str], torch.Tensor] = {}
    real = quantize.gptq

    def spy(weight, hessian, grid, **kwargs):
        name = next((n for n, m in model.blocks[0].named_modules() if getattr(m, "weight", None) is weight),
                    None)  # block 0's layers only
        if name is not None:
            seen[sequential, name] = hessian.clone()
        return real(weight, hessian, grid, **kwargs)

    monkeypatch.setattr(quantize, "gptq", spy)
    for sequential in (True, False):
        model = tiny_lm()
        quantize_model(model, "gptq", Grid(3, 32), calibration=calibration, sequential=sequential)
    # q sees the block's input either way; o and down see what the rounded q/k/v and gate/up produce
    assert torch.equal(seen[True, "attn.q_proj"], seen[False, "attn.q_proj"])
    for later in ("attn.o_proj", "mlp.down_proj"):
        assert not torch.allclose(seen[True, later], seen[False, later])
