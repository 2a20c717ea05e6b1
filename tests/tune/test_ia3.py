"""(IA)^3: starts as the base model, trains only the scales, merges exactly, and round-trips with `peft`."""

from __future__ import annotations

import pytest
import torch

from lmforge.model.checkpoint import load_checkpoint
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tune.ia3 import IA3Config, IA3Error, IA3Linear, add_ia3, ia3_layers, merge_ia3
from lmforge.tune.peft_io import AdapterError, load_ia3, read_adapter_config, save_ia3

from .conftest import TINY_LLAMA, tiny_llama

IDS = torch.tensor([[1, 5, 9, 33, 2, 71, 40, 12, 8, 90]])


def _randomize(model, seed: int = 1) -> None:
    """The scales start at one (so the model starts as the base); parity tests need a real change."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ia3_layers(model).values():
            layer.ia3_l.mul_(1 + 0.3 * torch.randn(layer.ia3_l.shape, generator=g))


def test_ia3_starts_as_the_base_and_trains_only_the_scales():
    model = tiny_llama()
    before = model(IDS).logits
    names = add_ia3(model, IA3Config())
    targets = ("attn.k_proj", "attn.v_proj", "mlp.down_proj")
    assert names == [f"blocks.{i}.{m}" for i in range(2) for m in targets]
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {  # PEFT's shapes: (out, 1) scales an output, (1, in) an input
        **{f"blocks.{i}.attn.{m}.ia3_l": (32, 1) for i in range(2) for m in ("k_proj", "v_proj")},
        **{f"blocks.{i}.mlp.down_proj.ia3_l": (1, 128) for i in range(2)}}
    model(IDS).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_the_scales_act_where_the_paper_says():
    """l_k and l_v scale the key and value projections' outputs; l_ff the down projection's input."""
    model = tiny_llama()
    add_ia3(model, IA3Config())
    _randomize(model)
    x = torch.randn(3, 128)
    k, down = model.get_submodule("blocks.0.attn.k_proj"), model.get_submodule("blocks.0.mlp.down_proj")
    torch.testing.assert_close(k(x[:, :64]), k.base(x[:, :64]) * k.ia3_l.T)
    torch.testing.assert_close(down(x), down.base(x * down.ia3_l))


@pytest.mark.parametrize("bias", [False, True])
def test_merge_is_exact_and_leaves_the_base_untouched(bias):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY_LLAMA | {"qkv_bias": bias, "mlp_bias": bias})).eval()
    with torch.no_grad():  # biases start at zero: make them count (an output scale scales its bias)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)
    base = {n: p.clone() for n, p in model.named_parameters()}
    add_ia3(model, IA3Config())
    _randomize(model)
    unmerged = model(IDS).logits
    for layer in ia3_layers(model).values():
        layer.merge()
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
    for layer in ia3_layers(model).values():
        layer.unmerge()
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=0, atol=0)
    assert all(torch.equal(layer.base.weight, base[f"{name}.weight"])
               for name, layer in ia3_layers(model).items())  # the base weight was never touched
    plain = merge_ia3(model)
    assert not ia3_layers(plain) and not any("ia3" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_settings_are_checked():
    with pytest.raises(IA3Error, match="feedforward_modules must be among"):
        add_ia3(tiny_llama(), IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(IA3Error, match="ia3.target_modules: no linear layer named qkv"):
        add_ia3(tiny_llama(), IA3Config(target_modules=["qkv"], feedforward_modules=[]))
    model = tiny_llama()
    assert add_ia3(model, IA3Config(target_modules=["v_proj", "up_proj"], feedforward_modules=["up_proj"],
                                    layers=[1])) == ["blocks.1.attn.v_proj", "blocks.1.mlp.up_proj"]
    assert isinstance(model.get_submodule("blocks.1.mlp.up_proj"), IA3Linear)
    assert model.get_submodule("blocks.1.mlp.up_proj").ia3_l.shape == (1, 64)


def test_peft_loads_our_adapter_with_the_same_logits(tiny_folder, tmp_path, transformers, peft):
    model, _ = load_checkpoint(tiny_folder)
    config = IA3Config()
    add_ia3(model, config)
    _randomize(model)
    save_ia3(model, tmp_path / "adapter", config)
    written = read_adapter_config(tmp_path / "adapter")
    assert written["peft_type"] == "IA3" and written["feedforward_modules"] == ["down_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = torch.cat([IDS, IDS.flip(1)])
    with torch.no_grad():
        torch.testing.assert_close(theirs(batch).logits, model.eval()(batch).logits, rtol=1e-4, atol=1e-4)


def test_we_load_peft_adapters_with_the_same_logits(tiny_folder, tmp_path, transformers, peft):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    theirs = peft.get_peft_model(base, peft.IA3Config(task_type="CAUSAL_LM"))  # PEFT's Llama defaults
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "ia3_l" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path / "peft-made")
    model, _ = load_checkpoint(tiny_folder)
    config = load_ia3(model, tmp_path / "peft-made")
    assert len(ia3_layers(model)) == 2 * 3 and config.feedforward_modules == ["blocks.0.mlp.down_proj",
                                                                               "blocks.1.mlp.down_proj"]
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, theirs.eval()(IDS).logits, rtol=1e-4, atol=1e-4)
        merge_ia3(model)
        torch.testing.assert_close(model(IDS).logits, theirs(IDS).logits, rtol=1e-4, atol=1e-4)


def test_a_lora_folder_is_not_an_ia3_folder(tmp_path, tiny_folder):
    model, _ = load_checkpoint(tiny_folder)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(AdapterError, match="LORA adapter, not IA3"):
        load_ia3(model, tmp_path)
