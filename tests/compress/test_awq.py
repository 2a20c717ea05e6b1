"""AWQ: its scaling leaves the float model unchanged, and its searches cut the rounding error."""

import torch

from lmforge.compress.awq import ScaleGroup, apply_scales, scale_groups, search_clip, search_scales
from lmforge.compress.grid import Grid

from .conftest import correlated_inputs, tiny_lm


def test_folding_scales_into_the_norms_and_up_proj_leaves_the_block_unchanged():
    model = tiny_lm()
    block = model.blocks[0]
    x = torch.randn(2, 16, 64)
    rope = model.rotary(torch.arange(16).expand(2, 16))
    before = block(x, rope, None, None)[0]
    # grouped-query attention: no v -> o pair
    assert [g.previous for g in scale_groups(block)] == ["attn_norm", "mlp_norm", "mlp.up_proj"]
    for group in scale_groups(block):
        width = block.get_submodule(group.layers[0]).in_features
        apply_scales(block, group, torch.rand(width) * 3 + 0.2)
    assert torch.allclose(block(x, rope, None, None)[0], before, atol=1e-4)


def test_without_grouped_query_attention_v_scales_into_o():
    block = tiny_lm(n_kv_heads=4).blocks[0]
    assert ScaleGroup("attn.v_proj", ("attn.o_proj",)) in scale_groups(block)


def test_scaling_protects_the_outlier_channels():
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    x = correlated_inputs(2048, 64)
    grid = Grid(3, 32)
    codes, step, offset = grid.rtn(weight)
    rtn_error = float((x @ weight.T - x @ grid.dequantize(codes, step, offset).T).square().mean())
    s, alpha, error = search_scales(weight, x, x.abs().mean(0), grid)
    assert alpha > 0 and error < 0.7 * rtn_error


def test_clipping_only_shrinks_ranges_where_it_lowers_the_output_error():
    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    weight[0, 0] = 12.0  # one outlier weight stretches its group's range
    x = correlated_inputs(512, 64)
    grid = Grid(3, 32)
    top = search_clip(weight, x, grid)
    full = weight.view(32, 2, 32).abs().amax(-1)
    assert (top <= full + 1e-6).all() and (top >= 0.5 * full - 1e-6).all()
    groups = weight.view(32, 2, 32)
    clipped = torch.maximum(torch.minimum(groups, top[..., None]), -top[..., None]).view(32, 64)

    def error(w):
        return float((x @ weight.T - x @ grid.dequantize(*grid.rtn(w)).T).square().mean())

    assert error(clipped) <= error(weight)
