"""The engine runs every adapter as the adapted model computes it: LoRA and (IA)^3 merged, a prefix
written into each sequence's cache, bottleneck adapters called by the runner (C kernel off)."""

import inspect

import pytest
import torch

from lmforge.infer import kernels
from lmforge.infer.engine import Engine, GenerationError
from lmforge.infer.sampling import SamplingParams
from lmforge.model.checkpoint import load_checkpoint, save_checkpoint
from lmforge.tune.adapters import BottleneckConfig, add_bottleneck
from lmforge.tune.apply import load_adapter
from lmforge.tune.ia3 import IA3Config, add_ia3
from lmforge.tune.lora import LoRAConfig, add_lora
from lmforge.tune.peft_io import save_bottleneck, save_ia3, save_lora, save_prefix
from lmforge.tune.prefix import PrefixConfig, add_prefix

from .conftest import tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=8)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11], [12, 13, 14, 15, 16, 17]]
METHODS = {  # method -> (add it, its config, save it)
    "lora": (add_lora, LoRAConfig(r=4, alpha=8, dropout=0.0), save_lora),
    "ia3": (add_ia3, IA3Config(), save_ia3),
    "prefix": (add_prefix, PrefixConfig(num_virtual_tokens=3), save_prefix),
    "adapter": (add_bottleneck, BottleneckConfig(r=8), save_bottleneck),
}


def _adapted(method: str, variant: str = "llama-gqa"):
    """A tiny model with a trained-looking adapter (every trainable tensor moved off its init)."""
    model = tiny_model(variant)
    add, config, _ = METHODS[method]
    add(model, config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.endswith("prompt_embeddings"):  # the prefix starts random
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), config


def _greedy_by_recomputation(model, prompt, n):
    """`Transformer.forward` over the whole sequence for every token: no cache, no runner."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("cache", ["static", "paged"])
@pytest.mark.parametrize("method", list(METHODS))
def test_the_engine_runs_a_saved_adapter_as_the_adapted_model_computes(tmp_path, method, cache):
    trained, config = _adapted(method)
    METHODS[method][2](trained, tmp_path / "adapter", config)
    model = tiny_model()
    assert load_adapter(model, tmp_path / "adapter") == method
    engine = Engine(model, max_batch_size=3, cache=cache, block_size=4, num_blocks=40)
    assert engine.runner.fast == (kernels.available() and method != "adapter")  # C kernel: all but adapters
    results = engine.complete(PROMPTS, GREEDY)  # 5 requests through 3 slots: ragged batches, slots reused
    expected = [_greedy_by_recomputation(trained, prompt, 8) for prompt in PROMPTS]
    assert [r.token_ids for r in results] == expected
    assert expected != [_greedy_by_recomputation(tiny_model(), p, 8) for p in PROMPTS]  # the adapter matters


@pytest.mark.parametrize("method", ["prefix", "adapter"])
def test_unmerged_adapters_run_on_every_architecture(variant, method):
    """GPT-2's learned positions, ALiBi, a sliding window, QK-norm, MoE: the prefix's positions
    and the adapters' place in the block agree between the engine and the model."""
    model, _ = _adapted(method, variant)
    engine = Engine(model, max_batch_size=2)
    results = engine.complete(PROMPTS[:3], GREEDY)
    assert [r.token_ids for r in results] == [_greedy_by_recomputation(model, p, 8) for p in PROMPTS[:3]]


def test_speculative_decoding_keeps_the_prefix():
    model, _ = _adapted("prefix")
    engine = Engine(model, draft_model=tiny_model(seed=1), num_speculative=3)
    [result] = engine.complete([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=12))
    assert result.token_ids == _greedy_by_recomputation(model, [1, 2, 3], 12)
    assert result.stats.draft_tokens > 0


def test_a_prefix_takes_its_tokens_from_the_context():
    model = tiny_model()  # a context of 64 tokens
    add_prefix(model, PrefixConfig(num_virtual_tokens=4))
    engine = Engine(model)
    with pytest.raises(GenerationError, match="the context is 60 tokens"):
        engine.add_request(list(range(1, 60)), SamplingParams(max_tokens=2))
    until_full = SamplingParams(temperature=0, max_tokens=None)
    [result] = engine.complete([list(range(1, 50))], until_full)
    assert len(result.token_ids) == 60 - 49 and result.finish_reason == "length"
    assert result.token_ids == _greedy_by_recomputation(model, list(range(1, 50)), 11)
    with pytest.raises(GenerationError, match="beam search does not run a prefix"):
        engine.beam_search([1, 2, 3], width=2, max_tokens=4)


@pytest.mark.parametrize("cache", ["static", "paged"])
def test_a_peft_prefix_generates_what_transformers_generates(tmp_path, cache):
    """A prefix made by `peft`, run by the engine, gives transformers' greedy tokens.

    The reference is transformers' `generate` on the base model whose KV cache starts with
    peft's prefix (`PeftModel.get_prompt`): what `PeftModel.generate` intends. It is not
    `PeftModel.generate` itself, which with transformers 5 (5.25, peft 0.21.2) ignores the
    prefix: peft injects `past_key_values` while generate passes its own `cache`, and the
    model drops the former. The reference is checked against peft's forward pass too.
    """
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    save_checkpoint(tmp_path / "base", tiny_model())
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    theirs = peft.get_peft_model(base, peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft-made")
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([[0] * 4 + prompt])  # stand-ins for the 4 virtual tokens already cached
            out = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                do_sample=False, **{cache_arg: theirs.get_prompt(batch_size=1)})
            expected.append(out[0, ids.shape[1]:].tolist())
        assert expected == [_greedy_by_recomputation(lambda x: theirs(input_ids=x), p, 8) for p in PROMPTS]
    model, _ = load_checkpoint(tmp_path / "base")
    assert load_adapter(model, tmp_path / "peft-made") == "prefix"
    engine = Engine(model, max_batch_size=3, cache=cache, block_size=4, num_blocks=40)
    assert [r.token_ids for r in engine.complete(PROMPTS, GREEDY)] == expected
