"""Rollouts on the Engine: they follow the policy's weights after each optimizer step (full and LoRA),
the recomputed log-probs are the training forward's, rows follow the SFT label convention, and the
batch source resumes mid-buffer with the very rows an uninterrupted run would draw."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.align.rollout import (
    RolloutConfig,
    RolloutError,
    Rollouts,
    RolloutSource,
    frozen_copy,
    sample_rollouts,
    token_logps,
)
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.train.batch import IGNORE_INDEX, Batch
from lmforge.tune.lora import LoRAConfig, add_lora, merge_lora

PROMPTS = ["q1:", "what?", "hello there", "x"]
CONFIG = RolloutConfig(samples_per_prompt=2, prompts_per_rollout=4, max_new_tokens=6, seed=3)
SEEDS = list(range(100, 108))


def _sft_step(model, tokenizer, lr: float = 0.05) -> None:
    """One optimizer step that pushes the model hard toward answering 'zzzz' (changes its samples)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    ids = torch.tensor([tokenizer.encode(p + "zzzzzz")[:8] for p in ["q1:zz", "what?", "hello", "xzzz"]])
    model.train()
    logits = model(ids[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, model.config.vocab_size), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()


def _reference_samples(plain_model, tokenizer) -> list[list[int]]:
    """What an engine built from scratch over an independent copy of the weights samples, same seeds."""
    engine = Engine(plain_model, tokenizer, max_batch_size=8)
    requests = [tokenizer.encode(p) for p in PROMPTS for _ in range(2)]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=6) for s in SEEDS]
    return [c.token_ids for c in engine.complete(requests, params)]


def _rollout(policy, tokenizer) -> Rollouts:
    return sample_rollouts(policy, PROMPTS, [tokenizer.encode(p) for p in PROMPTS], CONFIG, SEEDS,
                           tokenizer=tokenizer)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_rollouts_use_the_weights_of_the_latest_optimizer_step(tiny, tokenizer, method):
    policy = tiny(0)
    if method == "lora":
        add_lora(policy, LoRAConfig(r=4, alpha=8, dropout=0.0))
    before = _rollout(policy, tokenizer)
    _sft_step(policy, tokenizer)
    after = _rollout(policy, tokenizer)
    assert after.completion_ids != before.completion_ids  # the step changed what is sampled ...
    independent = copy.deepcopy(policy)
    if method == "lora":
        independent = merge_lora(independent)
    # ... to exactly what the updated weights sample on a brand-new engine
    assert after.completion_ids == _reference_samples(independent.eval(), tokenizer)
    assert policy.training  # the engine's eval() was undone
    assert after.tokens_per_s > 0 and after.completion_tokens == sum(map(len, after.completion_ids))


def test_frozen_copy_of_a_lora_policy_computes_the_same_and_shares_frozen_weights(tiny, tokenizer):
    policy = tiny(1)
    add_lora(policy, LoRAConfig(r=4, alpha=8, dropout=0.0))
    _sft_step(policy, tokenizer)  # B != 0: the merge matters
    copy_ = frozen_copy(policy)
    ids = torch.tensor([tokenizer.encode("hello there")])
    torch.testing.assert_close(copy_(ids).logits, policy(ids).logits, atol=1e-5, rtol=1e-5)
    assert copy_.embed.weight.data_ptr() == policy.embed.weight.data_ptr()  # frozen: shared, not copied
    q = policy.blocks[0].attn.q_proj
    assert copy_.blocks[0].attn.q_proj.weight.data_ptr() != q.base.weight.data_ptr()  # merged: its own
    assert not any(p.requires_grad for p in copy_.parameters())


def test_rows_follow_the_sft_label_convention():
    r = Rollouts(prompts=["a", "b"], prompt_ids=[[5, 6, 7], [8]], completion_ids=[[1, 2], [3, 4, 9]],
                 texts=["", ""], finish_reasons=["stop", "length"], seconds=1.0)
    ids, labels = r.rows(pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    X = IGNORE_INDEX
    assert labels.tolist() == [[X, X, 1, 2, X], [3, 4, 9, X, X]]


def test_recomputed_logps_are_the_training_forward_row_by_row(tiny, tokenizer):
    """Batched, padded, LM head at labelled positions only == each row alone through the plain forward."""
    policy = tiny(2)
    r = _rollout(policy, tokenizer)
    ids, labels = r.rows(pad_id=0)
    batched = token_logps(policy, ids, labels, temperature=0.7, micro_batch=3)
    for i, (p, c) in enumerate(zip(r.prompt_ids, r.completion_ids)):
        row = torch.tensor([p + c])
        logp = torch.log_softmax(policy(row).logits[0].float() / 0.7, -1)
        expected = logp[len(p) - 1:len(p) + len(c) - 1].gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        got = batched[i][labels[i] != IGNORE_INDEX]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert (batched[i][labels[i] == IGNORE_INDEX] == 0).all()


def _prepare(policy):
    def prepare(rollouts: Rollouts) -> Batch:
        ids, labels = rollouts.rows()
        return Batch(ids, labels, None, {"old_logps": token_logps(policy, ids, labels),
                                         "row": torch.arange(len(ids), dtype=torch.float32)})
    return prepare


def _source(policy, tokenizer, **overrides) -> RolloutSource:
    config = RolloutConfig(**(dict(samples_per_prompt=2, prompts_per_rollout=4, max_new_tokens=5, epochs=2,
                                   seed=11) | overrides))
    return RolloutSource(policy, PROMPTS + ["more", "and more"], tokenizer.encode, _prepare(policy), config,
                         tokenizer=tokenizer, rows_per_step=4)


def test_source_serves_every_row_once_per_epoch_then_a_new_buffer(tiny, tokenizer):
    policy = tiny(3)
    source = _source(policy, tokenizer)
    rows = [source.next_batch(2).extras["row"].tolist() for _ in range(8)]  # 8 rows x 2 epochs
    first, second = sorted(sum(rows[:4], [])), sorted(sum(rows[4:], []))
    assert first == second == list(map(float, range(8)))
    assert sum(rows[:4], []) != sum(rows[4:], [])  # reshuffled per epoch
    buffer = source.buffer
    source.next_batch(2)
    assert source.round == 1 and source.buffer is not buffer
    # token_norm: tokens of the optimizer step (4 rows) per micro-batch of 2 rows
    assert source.rows_per_step == 4


def test_source_resumes_mid_buffer_exactly(tiny, tokenizer):
    policy = tiny(4)
    a = _source(policy, tokenizer)
    drawn = [a.next_batch(2) for _ in range(3)]
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint's state.json holds
    rest = [a.next_batch(2) for _ in range(7)]  # the rest of this buffer, then a new round
    b = _source(policy, tokenizer)
    b.load_state_dict(state)
    resumed = [b.next_batch(2) for _ in range(7)]
    assert drawn  # (the first three were served before the checkpoint)
    for x, y in zip(rest, resumed):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        for key in x.extras:
            assert torch.equal(x.extras[key], y.extras[key]) or key == "rollout_tokens_per_s", key


def test_source_rejects_batches_that_do_not_divide(tiny, tokenizer):
    with pytest.raises(RolloutError, match="optimizer steps of 3 rows"):
        RolloutSource(tiny(0), PROMPTS, tokenizer.encode, _prepare(None), CONFIG, rows_per_step=3)
    with pytest.raises(RolloutError, match="temperature"):
        RolloutConfig(temperature=0.0).validate()
