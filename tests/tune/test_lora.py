"""LoRA: starts as the base model, trains only A and B, merges exactly, and round-trips with `peft`."""

from __future__ import annotations

import pytest
import torch

from lmforge.model.checkpoint import load_checkpoint
from lmforge.tune.lora import LoRAConfig, LoRAError, LoRALinear, add_lora, lora_layers, merge_lora
from lmforge.tune.peft_io import AdapterError, load_lora, read_adapter_config, save_lora

from .conftest import tiny_llama

IDS = torch.tensor([[1, 5, 9, 33, 2, 71, 40, 12, 8, 90]])


def _randomize_b(model, seed: int = 1) -> None:
    """B starts at zero (so LoRA starts as the base); parity tests need a real update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
            magnitude = layer.lora_magnitude_vector
            if magnitude is not None:
                magnitude.mul_(1 + 0.1 * torch.randn(magnitude.shape, generator=g))


def test_lora_starts_as_the_base_and_trains_only_a_and_b():
    model = tiny_llama()
    before = model(IDS).logits
    names = add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    layer = model.get_submodule("blocks.0.attn.q_proj")
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    assert LoRAConfig(r=4, alpha=8, rslora=True).scaling == 4.0  # alpha / sqrt(r)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_is_exact_and_unmerge_restores_the_adapter(dora):
    model = tiny_llama()
    add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, dora=dora))
    _randomize_b(model)
    unmerged = model(IDS).logits
    for layer in lora_layers(model).values():
        layer.merge()
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
    for layer in lora_layers(model).values():
        layer.unmerge()
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=0, atol=0)
    base = tiny_llama()
    assert all(torch.equal(layer.base.weight, base.get_submodule(name).weight)
               for name, layer in lora_layers(model).items())  # the base weight was never touched
    plain = merge_lora(model)
    assert not lora_layers(plain)
    torch.testing.assert_close(plain(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_dora_reuses_the_base_output_only_when_nothing_is_dropped():
    """Without dropout DoRA takes W x from the base's output (bias removed) instead of a second
    matmul; the answer is the merged weight's, with a bias, and dropout still sees its own x."""
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6, bias=True)
    x = torch.randn(3, 8)
    for dropout in (0.0, 0.5):
        layer = LoRALinear(base, LoRAConfig(r=2, alpha=4, dropout=dropout, dora=True))
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.1)
            layer.lora_magnitude_vector.mul_(1.1)
        layer.eval()  # dropout off: the reused path
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-6)
        layer.unmerge()
    layer.train()  # dropout 0.5 on: A sees a dropped x, W x is recomputed on it
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = layer.lora_dropout(x)
    norm = (layer.base_weight() + layer.delta_weight()).norm(dim=1).detach()
    scale = layer.lora_magnitude_vector / norm
    update = layer.lora_B(layer.lora_A(dropped)) * layer.scaling
    expected = base(x) + (scale - 1) * torch.nn.functional.linear(dropped, base.weight) + scale * update
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_targets_are_checked():
    with pytest.raises(LoRAError, match="no linear layer named qkv"):
        add_lora(tiny_llama(), LoRAConfig(target_modules=["qkv"]))
    model = tiny_llama()
    assert add_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], layers=[1])) == [
        "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    with pytest.raises(LoRAError, match="exceeds"):
        add_lora(tiny_llama(), LoRAConfig(r=100))


@pytest.mark.parametrize("variant", [{}, {"rslora": True}, {"dora": True}])
def test_peft_loads_our_adapter_with_the_same_logits(tiny_folder, tmp_path, transformers, peft, variant):
    model, _ = load_checkpoint(tiny_folder)
    config = LoRAConfig(r=4, alpha=16, dropout=0.0, **variant)
    add_lora(model, config)
    _randomize_b(model)
    save_lora(model, tmp_path / "adapter", config)
    assert read_adapter_config(tmp_path / "adapter")["peft_type"] == "LORA"
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, model.eval()(IDS).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"use_rslora": True}])
def test_we_load_peft_adapters_with_the_same_logits(tiny_folder, tmp_path, transformers, peft, variant):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                          "down_proj"],
                                                       task_type="CAUSAL_LM", **variant))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.save_pretrained(tmp_path / "peft-made")
    model, _ = load_checkpoint(tiny_folder)
    config = load_lora(model, tmp_path / "peft-made")
    assert len(lora_layers(model)) == 2 * 3 and config.dora == bool(variant.get("use_dora"))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, theirs.eval()(IDS).logits, rtol=1e-4, atol=1e-4)


def test_bad_adapter_folders_are_clear_errors(tmp_path, tiny_folder):
    model, _ = load_checkpoint(tiny_folder)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_lora(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(AdapterError, match="IA3 adapter, not LoRA"):
        load_lora(model, tmp_path)
