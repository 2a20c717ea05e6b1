"""GRPO: group advantages on known numbers, the clip's zero gradients, ratio 1 and KL 0 before the
first update, dapo aggregation across accumulated micro-batches, learning on held-out prompts
(two seeds), and an exact resume through the one Trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.align.grpo import (
    GRPOConfig,
    GRPOObjective,
    aggregate,
    clipped_surrogate,
    group_advantages,
    grpo_source,
    k3_kl,
)
from lmforge.align.rollout import RolloutConfig, RolloutError, sample_rollouts
from lmforge.train.trainer import TrainConfig, Trainer
from lmforge.tune.finetune import FinetuneConfig, apply_method
from lmforge.tune.lora import LoRAConfig

TRAIN_PROMPTS = [f"q{i}:" for i in range(40)]
HELD_OUT = [f"held {i} >" for i in range(16)]


def digit_fraction(prompts, completions):
    """The programmatic reward: the fraction of the completion's characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def held_out_reward(policy, tokenizer, max_new_tokens: int = 8) -> float:
    config = RolloutConfig(samples_per_prompt=4, prompts_per_rollout=len(HELD_OUT),
                           max_new_tokens=max_new_tokens)
    r = sample_rollouts(policy, HELD_OUT, [tokenizer.encode(p) for p in HELD_OUT], config,
                        list(range(4 * len(HELD_OUT))), tokenizer=tokenizer)
    return sum(digit_fraction(r.prompts, r.texts)) / len(r.texts)


# ---------------------------------------------------------------------------------- the equations
def test_group_advantages_on_known_numbers():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, std = group_advantages(rewards, 4)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    expected = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0]
    torch.testing.assert_close(adv, torch.tensor(expected))
    torch.testing.assert_close(std, torch.tensor([s] * 4 + [0.0] * 4))
    adv, _ = group_advantages(rewards, 4, "none")  # Dr. GRPO: centred only
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    adv, _ = group_advantages(rewards, 2, "batch")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (rewards.std() + 1e-4))
    with pytest.raises(RolloutError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_clipped_tokens_get_no_gradient_and_the_others_do():
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 0.9])
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0])
    old = torch.zeros(6)
    logps = ratios.log().requires_grad_(True)
    loss, ratio, active = clipped_surrogate(logps, old, advantages, 0.2, 0.2)
    loss.sum().backward()
    clipped = torch.tensor([True, False, True, False, False, False])
    assert torch.equal(active, clipped)
    assert (logps.grad[clipped] == 0).all()
    # unclipped: d/dlogp of -A * exp(logp - old) = -A * ratio
    torch.testing.assert_close(logps.grad[~clipped], (-advantages * ratios)[~clipped])
    torch.testing.assert_close(ratio, ratios)


def test_k3_kl_is_zero_at_equality_and_positive_elsewhere():
    a = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(k3_kl(a, a), torch.zeros(3))
    b = torch.tensor([-1.5, -1.0, -0.5])
    q = b - a
    torch.testing.assert_close(k3_kl(a, b), q.exp() - q - 1)
    assert (k3_kl(a, b)[:2] > 0).all()


def test_dapo_over_accumulated_micro_batches_is_the_mean_over_all_tokens_of_the_step():
    torch.manual_seed(0)
    per_token = torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]).float()
    total = mask.sum()
    # two micro-batches of 2 rows, each row carrying token_norm = step tokens * rows / step rows
    norm = torch.full((2,), float(total) * 2 / 4)
    accumulated = sum(aggregate(per_token[i:i + 2], mask[i:i + 2], "dapo", token_norm=norm) / 2
                      for i in (0, 2))
    torch.testing.assert_close(accumulated, (per_token * mask).sum() / total)
    grpo = aggregate(per_token, mask, "grpo")
    torch.testing.assert_close(grpo, ((per_token * mask).sum(1) / mask.sum(1)).mean())
    torch.testing.assert_close(aggregate(per_token, mask, "dr_grpo", max_new_tokens=5),
                               (per_token * mask).sum() / 20)


# ---------------------------------------------------------------------------------- on a model
def _config(seed: int = 0, **overrides) -> GRPOConfig:
    rollout = RolloutConfig(samples_per_prompt=8, prompts_per_rollout=4, max_new_tokens=8, seed=seed)
    return GRPOConfig(rollout=rollout, **overrides)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_first_update_has_ratio_one_and_kl_zero(tiny, tokenizer, precision):
    """Old, reference and new log-probs come from the same forward (bf16 autocast on both sides when
    training in bf16), so before any update rho = 1, the clip is idle and the KL is 0."""
    policy = tiny(0)
    config = _config(beta=0.04)
    config.rollout.precision = precision
    source = grpo_source(policy, TRAIN_PROMPTS, tokenizer.encode, digit_fraction, config, tokenizer=tokenizer,
                         rows_per_step=32)
    batch = source.next_batch(16)
    policy.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, metrics = GRPOObjective(config).loss(policy, batch)
    assert abs(float(metrics["ratio"]) - 1) < 1e-5
    assert float(metrics["kl"]) < 1e-6 and float(metrics["clip_ratio"]) == 0.0
    assert batch.extras["advantages"].abs().sum() > 0  # there is something to learn
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def _fit(policy, store, config: GRPOConfig, run_dir, steps: int, *, tokenizer, checkpoint_interval: int = 0,
         resume=None, lr: float = 1e-2) -> Trainer:
    source = grpo_source(policy, TRAIN_PROMPTS, tokenizer.encode, digit_fraction, config, tokenizer=tokenizer,
                         rows_per_step=32)
    train = TrainConfig(steps=steps, batch_tokens=32 * 16, micro_batch=16, seq_len=16, eval_interval=0,
                        checkpoint_interval=checkpoint_interval, log_interval=100)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    trainer = Trainer(policy, GRPOObjective(config), optimizer, lambda step: 1.0, source, train, run_dir,
                      quiet=True, tokenizer=tokenizer, model_store=store)
    if resume is not None:
        trainer.resume(resume)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_raises_the_reward_on_held_out_prompts(tiny, tokenizer, tmp_path, seed):
    policy = tiny(seed)
    before = held_out_reward(policy, tokenizer)
    trainer = _fit(policy, None, _config(seed), tmp_path, 20, tokenizer=tokenizer)
    after = held_out_reward(policy, tokenizer)
    assert after > before + 0.3, (before, after)  # ~0.04 (10 digits of 259 bytes) -> most of them
    history = trainer.history
    assert history[-1]["reward"] > history[0]["reward"]
    assert {"reward", "reward_std", "clip_ratio", "completions/mean_length", "rollout/tokens_per_s",
            "entropy"} <= set(history[0])


def _policy(tiny, method: str):
    """A tiny policy, full or LoRA (as `lmforge finetune` makes it), and what its checkpoints hold."""
    policy = tiny(5)
    lora = LoRAConfig(r=4, alpha=8, dropout=0.05)  # the dropout is switched off by grpo_source
    return policy, apply_method(policy, FinetuneConfig(model="tiny", method=method, lora=lora))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_after_interruption_gives_the_same_losses(tiny, tokenizer, tmp_path, method):
    """Checkpoint at step 3, mid-buffer (a buffer is 2 epochs of one step each: step 3 is the second
    buffer's first epoch), resume in new objects, and match a straight run loss for loss."""
    config = _config(3, beta=0.04, epsilon_high=0.28)
    config.rollout.epochs = 2
    straight = _fit(*_policy(tiny, method), config, tmp_path / "a", 6, tokenizer=tokenizer)
    _fit(*_policy(tiny, method), config, tmp_path / "b", 3, tokenizer=tokenizer, checkpoint_interval=3)
    resumed = _fit(*_policy(tiny, method), config, tmp_path / "b", 6, tokenizer=tokenizer,
                   checkpoint_interval=3, resume=tmp_path / "b" / "checkpoints" / "step-000003")
    assert straight.history[-1]["kl"] > 0  # the policy left the reference
    losses = [r["loss"] for r in straight.history]
    assert [r["loss"] for r in resumed.history] == losses
    assert len(set(losses)) > 1
    state = json.loads((tmp_path / "b/checkpoints/step-000003/trainer_state/state.json").read_text())
    assert state["data"]["round"] == 1 and state["data"]["served"] == 2  # mid-buffer, buffer saved
    assert state["data"]["buffer"] is not None
    adapter = (tmp_path / "b/checkpoints/step-000003/adapter_config.json").is_file()
    assert adapter == (method == "lora")  # a LoRA run checkpoints only its adapter, a PEFT folder


def test_config_is_checked():
    with pytest.raises(RolloutError, match="samples_per_prompt >= 2"):
        GRPOConfig(rollout=RolloutConfig(samples_per_prompt=1)).validate()
    with pytest.raises(RolloutError, match="loss_type"):
        GRPOConfig(loss_type="sum").validate()
