"""Prefix tuning: N cached tokens in every layer; it trains alone and round-trips with `peft`."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.infer.cache import StaticKVCache
from lmforge.model.checkpoint import load_checkpoint
from lmforge.tune.peft_io import (
    AdapterError,
    AdapterStore,
    load_prefix,
    peft_tensor_name,
    prefix_adapter_config,
    read_adapter_config,
    save_prefix,
)
from lmforge.tune.prefix import PrefixConfig, PrefixError, add_prefix, prefix_of

from .conftest import tiny_llama

IDS = torch.tensor([[1, 5, 9, 33, 2, 71, 40, 12, 8, 90]])


def test_a_prefix_is_n_tokens_already_in_the_cache():
    """Fill the prefix with the keys and values the base model computes for N real tokens u
    (RoPE already applied, at positions 0..N-1): the prefixed model on x must then give the
    base model's logits for x after u. This pins down the layout (key, value per layer and
    head), that prefix keys enter as they are, and that x's positions start at N."""
    base, model = tiny_llama(), tiny_llama()
    u = torch.tensor([[7, 3, 61, 20]])
    cache = StaticKVCache.for_model(base, 1, 16)
    with torch.no_grad():
        base(u, torch.arange(4)[None], cache)
    add_prefix(model, PrefixConfig(num_virtual_tokens=4))
    keys, values = cache.keys[:, 0, :, :4], cache.values[:, 0, :, :4]  # [layers, kv_heads, N, head_dim]
    rows = torch.stack([keys, values], 1).permute(3, 0, 1, 2, 4)  # PEFT's: [N, layer, key|value, head, dim]
    with torch.no_grad():
        prefix_of(model).prompt_embeddings.copy_(rows.reshape(4, -1))
        expected = base(torch.cat([u, IDS], dim=1)).logits[:, 4:]
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_only_the_prefix_trains_and_packing_is_refused():
    model = tiny_llama()
    assert add_prefix(model, PrefixConfig(num_virtual_tokens=3)) == ["prefix_tuning.prompt_embeddings"]
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prefix_tuning.prompt_embeddings": (3, 2 * 2 * 2 * 16)}  # layers, k|v, kv heads, dim
    model(IDS).logits.sum().backward()
    assert prefix_of(model).prompt_embeddings.grad.abs().sum() > 0
    with pytest.raises(PrefixError, match="data.pack: false"):
        PrefixConfig().validate(pack=True)
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    with pytest.raises(PrefixError, match="positions restart"):
        model(IDS, packed)
    torch.testing.assert_close(model(IDS, torch.arange(10)[None]).logits, model(IDS).logits, rtol=0, atol=0)
    with pytest.raises(PrefixError, match="num_virtual_tokens must be"):
        add_prefix(tiny_llama(), PrefixConfig(num_virtual_tokens=0))


def test_cached_decoding_sees_the_prefix_too():
    """`Transformer.forward` with a KV cache (token by token) gives the full forward's logits."""
    model = tiny_llama()
    add_prefix(model, PrefixConfig(num_virtual_tokens=5))
    cache = StaticKVCache.for_model(model, 1, 32)
    with torch.no_grad():
        full = model(IDS).logits
        steps = [model(IDS[:, t:t + 1], torch.tensor([[t]]), cache).logits for t in range(IDS.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_peft_loads_our_prefix_with_the_same_logits(tiny_folder, tmp_path, transformers, peft):
    model, _ = load_checkpoint(tiny_folder)
    config = PrefixConfig(num_virtual_tokens=6)
    add_prefix(model, config)
    save_prefix(model, tmp_path / "adapter", config)
    written = read_adapter_config(tmp_path / "adapter")
    assert written["peft_type"] == "PREFIX_TUNING" and written["token_dim"] == 2 * 16  # kv heads x head dim
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = torch.cat([IDS, IDS.flip(1)])
    with torch.no_grad():
        torch.testing.assert_close(theirs(batch).logits, model.eval()(batch).logits, rtol=1e-4, atol=1e-4)


def test_we_load_peft_prefixes_with_the_same_logits(tiny_folder, tmp_path, transformers, peft):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    theirs = peft.get_peft_model(base, peft.PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"))
    theirs.save_pretrained(tmp_path / "peft-made")
    model, _ = load_checkpoint(tiny_folder)
    ours = tiny_llama()
    add_prefix(ours, PrefixConfig(num_virtual_tokens=5))
    # the settings we would write, the same tensor shape, and the same initialisation: N(0, 1)
    written = read_adapter_config(tmp_path / "peft-made")
    for key, value in prefix_adapter_config(PrefixConfig(5), ours.config, None).items():
        assert key == "base_model_name_or_path" or written[key] == value, key
    assert prefix_of(ours).prompt_embeddings.shape == theirs.prompt_encoder.default.embedding.weight.shape
    assert 0.8 < float(prefix_of(ours).prompt_embeddings.detach().std()) < 1.2
    assert load_prefix(model, tmp_path / "peft-made").num_virtual_tokens == 5
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, theirs.eval()(IDS).logits, rtol=1e-4, atol=1e-4)


def test_a_training_checkpoint_stores_the_prefix_under_peft_s_name(tmp_path):
    model = tiny_llama()
    trainable = add_prefix(model, PrefixConfig(num_virtual_tokens=2))
    assert peft_tensor_name(trainable[0], model.config) == "prompt_embeddings"
    store = AdapterStore(prefix_adapter_config(PrefixConfig(2), model.config, None), trainable)
    store.write(tmp_path, model.state_dict(), model.config, None, step=1)
    restored = store.read(tmp_path, model.config)
    assert torch.equal(restored[trainable[0]], prefix_of(model).prompt_embeddings)


def test_a_prefix_for_another_model_is_refused(tmp_path, tiny_folder):
    model = tiny_llama()
    add_prefix(model, PrefixConfig(num_virtual_tokens=2))
    save_prefix(model, tmp_path / "a", PrefixConfig(num_virtual_tokens=2))
    config = read_adapter_config(tmp_path / "a") | {"num_layers": 5}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="made for another model"):
        load_prefix(load_checkpoint(tiny_folder)[0], tmp_path / "a")
