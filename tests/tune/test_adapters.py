"""Bottleneck adapters start as the identity, sit between each sublayer and its residual add, train
alone and round-trip through their folder; `load_adapter` applies every method for inference."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tune.adapters import BottleneckConfig, BottleneckError, add_bottleneck, bottleneck_adapters
from lmforge.tune.apply import load_adapter
from lmforge.tune.ia3 import IA3Config, IA3Linear, add_ia3
from lmforge.tune.lora import LoRAConfig, LoRALinear, add_lora
from lmforge.tune.peft_io import (
    AdapterError,
    AdapterStore,
    bottleneck_adapter_config,
    load_bottleneck,
    read_adapter_config,
    save_bottleneck,
    save_ia3,
    save_lora,
    save_prefix,
)
from lmforge.tune.prefix import PrefixConfig, add_prefix, prefix_of

from .conftest import TINY_LLAMA, tiny_llama

IDS = torch.tensor([[1, 5, 9, 33, 2, 71, 40, 12, 8, 90]])


def _randomize(model, seed: int = 1) -> None:
    """`up` starts at zero (so each adapter starts as the identity); round trips need a real change."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in bottleneck_adapters(model).values():
            adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=g) * 0.3)
            adapter.up.bias.copy_(torch.randn(adapter.up.bias.shape, generator=g) * 0.3)


def test_adapters_start_as_the_identity_and_train_alone():
    model = tiny_llama()
    before = model(IDS).logits
    names = add_bottleneck(model, BottleneckConfig(r=8))
    assert names == [f"blocks.{i}.{s}_adapter" for i in range(2) for s in ("attn", "mlp")]
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{a}.{p}.{w}" for a in names for p in ("down", "up") for w in ("weight", "bias")}
    assert all(n in tiny_llama().state_dict() for n, p in model.named_parameters() if not p.requires_grad)
    model(IDS).logits.sum().backward()  # the first step moves up (down's gradient waits for up to be nonzero)
    assert all(a.up.weight.grad.abs().sum() > 0 for a in bottleneck_adapters(model).values())


def test_each_adapter_sits_between_its_sublayer_and_the_residual_add():
    model = tiny_llama()
    add_bottleneck(model, BottleneckConfig(r=8))
    _randomize(model)
    block, x = model.blocks[0], torch.randn(1, 10, 64)
    rope = model.rotary(torch.arange(10)[None])
    h = x + block.attn_adapter(block.attn.forward(block.attn_norm(x), rope, None))  # `forward`: no hook
    expected = h + block.mlp_adapter(block.mlp.forward(block.mlp_norm(h)))
    torch.testing.assert_close(block(x, rope, None, None)[0], expected)


def test_settings_are_checked_and_choose_where_adapters_go():
    with pytest.raises(BottleneckError, match="adapter.r"):
        add_bottleneck(tiny_llama(), BottleneckConfig(r=0))
    with pytest.raises(BottleneckError, match="activation"):
        add_bottleneck(tiny_llama(), BottleneckConfig(activation="swish2"))
    with pytest.raises(BottleneckError, match="attn and/or mlp"):
        add_bottleneck(tiny_llama(), BottleneckConfig(sublayers=["ffn"]))
    with pytest.raises(BottleneckError, match="blocks 0..1"):
        add_bottleneck(tiny_llama(), BottleneckConfig(layers=[2]))
    only = BottleneckConfig(sublayers=["mlp"], layers=[1])
    assert add_bottleneck(tiny_llama(), only) == ["blocks.1.mlp_adapter"]


def test_a_mixture_of_experts_keeps_its_aux_loss():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY_LLAMA | {"n_experts": 4, "n_experts_per_token": 2})).eval()
    before = model(IDS)
    add_bottleneck(model, BottleneckConfig(r=4))
    after = model(IDS)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    torch.testing.assert_close(after.aux_loss, before.aux_loss)


def test_save_and_load_round_trip_the_logits_exactly(tmp_path):
    model = tiny_llama()
    config = BottleneckConfig(r=8, activation="silu", layers=[0, 1])
    add_bottleneck(model, config)
    _randomize(model)
    trained = model(IDS).logits
    save_bottleneck(model, tmp_path / "adapter", config, base_model="tiny")
    written = read_adapter_config(tmp_path / "adapter")
    assert (written["peft_type"], written["r"], written["activation"]) == ("LMFORGE_BOTTLENECK", 8, "silu")
    fresh = tiny_llama()
    assert load_bottleneck(fresh, tmp_path / "adapter") == config
    torch.testing.assert_close(fresh(IDS).logits, trained, rtol=0, atol=0)
    twin = copy.deepcopy(fresh)  # the hooks find the copy's own adapters
    with torch.no_grad():
        bottleneck_adapters(fresh)["blocks.0.attn_adapter"].up.weight.zero_()
    torch.testing.assert_close(twin(IDS).logits, trained, rtol=0, atol=0)


def test_a_training_checkpoint_keeps_lmforge_names(tmp_path):
    model = tiny_llama()
    add_bottleneck(model, BottleneckConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    store = AdapterStore(bottleneck_adapter_config(BottleneckConfig(r=4), None), trainable)
    store.write(tmp_path, model.state_dict(), model.config, None, step=1)
    restored = store.read(tmp_path, model.config)
    assert sorted(restored) == sorted(trainable)
    fresh = tiny_llama()
    load_bottleneck(fresh, tmp_path)  # a checkpoint folder is an adapter folder
    assert all(torch.equal(fresh.state_dict()[n], model.state_dict()[n]) for n in trainable)


def test_a_folder_with_foreign_tensors_is_refused(tmp_path):
    model = tiny_llama()
    add_bottleneck(model, BottleneckConfig(r=4))
    save_bottleneck(model, tmp_path / "a", BottleneckConfig(r=4))
    config = read_adapter_config(tmp_path / "a") | {"sublayers": ["mlp"]}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="tensors this model's adapters do not have"):
        load_bottleneck(tiny_llama(), tmp_path / "a")


# ---------------------------------------------------------------------------------- load_adapter
def _trained(method: str, folder, model):
    """`model` with a trained-looking adapter of `method` (not merged), also saved to `folder`."""
    g = torch.Generator().manual_seed(5)
    if method == "lora":
        config = LoRAConfig(r=4, alpha=8, dropout=0.0)
        add_lora(model, config)
        save = save_lora
    elif method == "ia3":
        config = IA3Config()
        add_ia3(model, config)
        save = save_ia3
    elif method == "prefix":
        config = PrefixConfig(num_virtual_tokens=3)
        add_prefix(model, config)
        save = save_prefix
    else:
        config = BottleneckConfig(r=4)
        add_bottleneck(model, config)
        save = save_bottleneck
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    save(model, folder, config)
    return model


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix", "adapter"])
def test_load_adapter_applies_each_method_for_inference(tmp_path, method):
    trained = _trained(method, tmp_path / "adapter", tiny_llama())
    model = tiny_llama()
    assert load_adapter(model, tmp_path / "adapter") == method
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, trained(IDS).logits, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())
    merged = method in ("lora", "ia3")  # linear changes fold into plain weights; the others stay modules
    assert not any(isinstance(m, (LoRALinear, IA3Linear)) for m in model.modules())
    assert (prefix_of(model) is not None) == (method == "prefix")
    assert bool(bottleneck_adapters(model)) == (method == "adapter")
    assert merged == (sorted(model.state_dict()) == sorted(tiny_llama().state_dict()))


def test_load_adapter_refuses_methods_it_does_not_run(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    with pytest.raises(AdapterError, match="PROMPT_TUNING adapter; lmforge runs"):
        load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("method", ["ia3", "prefix", "adapter"])
def test_a_few_steps_of_training_lower_the_loss(method):
    """Gradients reach each method's parameters through the hooks, and only those move."""
    model = tiny_llama()
    with torch.no_grad():  # weights larger than the init's, so that rescaling them can move the loss
        for p in model.parameters():
            p.mul_(4.0 if p.dim() == 2 else 1.0)
    {"ia3": lambda: add_ia3(model, IA3Config()), "prefix": lambda: add_prefix(model, PrefixConfig(4)),
     "adapter": lambda: add_bottleneck(model, BottleneckConfig(r=8))}[method]()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = (torch.arange(17) * 5 + torch.arange(4)[:, None] * 11) % 96  # a rule to learn: the next is +5
    losses = []
    for _ in range(20):
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
