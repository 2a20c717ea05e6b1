"""PPO: GAE against a hand-written reference and hand-derived numbers, whitening, KL estimators,
the clipped value loss's zero gradients, the buffer's reward shaping on a model (ratio 1, KL 0,
the score at the last token), learning on held-out prompts (two seeds), and an exact resume with
the value head in the checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.align.ppo import (
    PolicyWithValue,
    PPOConfig,
    PPOObjective,
    ValueHeadStore,
    gae,
    kl_per_token,
    ppo_source,
    value_loss,
    whiten,
)
from lmforge.align.rollout import RolloutConfig, RolloutError, sample_rollouts
from lmforge.train.batch import IGNORE_INDEX
from lmforge.train.trainer import TrainConfig, Trainer

TRAIN_PROMPTS = [f"q{i}:" for i in range(40)]
HELD_OUT = [f"held {i} >" for i in range(16)]


def digit_fraction(prompts, completions):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def held_out_reward(policy, tokenizer) -> float:
    config = RolloutConfig(samples_per_prompt=4, prompts_per_rollout=len(HELD_OUT), max_new_tokens=8)
    r = sample_rollouts(policy, HELD_OUT, [tokenizer.encode(p) for p in HELD_OUT], config,
                        list(range(4 * len(HELD_OUT))), tokenizer=tokenizer)
    return sum(digit_fraction(r.prompts, r.texts)) / len(r.texts)


# ---------------------------------------------------------------------------------- the equations
def reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """One episode, written out: delta_t = r_t + gamma V_t+1 - V_t; A_t = sum_k (gamma lam)^k delta_t+k."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]


def test_gae_on_hand_derived_numbers():
    # gamma = lam = 1: A_t = (rewards from t on) - V_t; here r = (0, 1), V = (0.5, 0.2)
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.8]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0]]))
    # lam = 0: one-step TD errors; gamma = 0.5: delta_0 = 0 + 0.5 * 0.2 - 0.5 = -0.4, delta_1 = 1 - 0.2
    adv, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), 0.5, 0.0)
    torch.testing.assert_close(adv, torch.tensor([[-0.4, 0.8]]))


def test_gae_matches_the_written_out_sum_on_ragged_rows():
    rewards = [[0.1, -0.2, 0.3, 1.5], [0.0, 2.0], [-1.0, 0.5, 0.25]]
    values = [[0.4, 0.3, -0.1, 0.7], [1.0, -0.5], [0.2, 0.2, 0.9]]
    width = 4
    r = torch.zeros(3, width)
    v = torch.full((3, width), 99.0)  # garbage past each row's end must not leak in
    mask = torch.zeros(3, width)
    for i, (rr, vv) in enumerate(zip(rewards, values)):
        r[i, :len(rr)], v[i, :len(vv)], mask[i, :len(rr)] = torch.tensor(rr), torch.tensor(vv), 1
    adv, ret = gae(r, v, mask, 0.9, 0.8)
    for i, (rr, vv) in enumerate(zip(rewards, values)):
        expected = reference_gae(rr, vv, 0.9, 0.8)
        torch.testing.assert_close(adv[i, :len(rr)], torch.tensor(expected))
        torch.testing.assert_close(ret[i, :len(rr)], torch.tensor(expected) + torch.tensor(vv))
        assert (adv[i, len(rr):] == 0).all() and (ret[i, len(rr):] == 0).all()


def test_whiten_gives_zero_mean_unit_variance_on_the_mask():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).float()
    w = whiten(x, mask)
    picked = w[mask.bool()]
    torch.testing.assert_close(picked.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(picked.var(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert (w[~mask.bool()] == 0).all()


def test_kl_estimators_on_known_numbers():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    torch.testing.assert_close(kl_per_token(logp, ref, "k1"), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(kl_per_token(logp, ref, "k3"), torch.tensor([math.exp(-0.5) + 0.5 - 1, 0.0]))


def test_clipped_value_loss_has_no_gradient_where_the_clipped_term_wins():
    old = torch.zeros(4)
    returns = torch.tensor([1.0, 1.0, -1.0, 0.1])
    values = torch.tensor([0.5, 1.5, 0.5, 0.15]).requires_grad_(True)
    loss, clipped = value_loss(values, old, returns, 0.2)
    loss.sum().backward()
    # V=0.5 towards R=1: the clipped V (0.2) is further from R -> its term wins, constant in V
    # V=1.5, R=1: unclipped error 0.25 < clipped (0.2 - 1)^2 -> clipped wins
    # V=0.5, R=-1: unclipped (1.5^2) > clipped (1.2^2) -> gradient V - R
    # V=0.15 inside the clip range: both terms equal, gradient V - R
    assert clipped.tolist() == [True, True, False, False]
    torch.testing.assert_close(values.grad, torch.tensor([0.0, 0.0, 1.5, 0.05]))
    torch.testing.assert_close(loss[2], torch.tensor(0.5 * 1.5 ** 2))


# ---------------------------------------------------------------------------------- on a model
def _config(seed: int = 0, **overrides) -> PPOConfig:
    rollout = RolloutConfig(samples_per_prompt=4, prompts_per_rollout=8, max_new_tokens=8, epochs=2,
                            seed=seed)
    return PPOConfig(**({"rollout": rollout, "kl_coef": 0.01} | overrides))


def test_buffer_puts_the_score_on_the_last_token_and_starts_at_ratio_one(tiny, tokenizer):
    model = PolicyWithValue(tiny(0))
    config = _config(lam=0.95, gamma=1.0, kl_estimator="k3")
    source = ppo_source(model, TRAIN_PROMPTS, tokenizer.encode, digit_fraction, config, tokenizer=tokenizer,
                        rows_per_step=16)
    batch = source.next_batch(8)
    x, mask = batch.extras, batch.labels != IGNORE_INDEX
    # reference = policy and V = 0 (zero-initialised head): rewards are the score at the last token, so
    # the return at completion token t is lam^(L-1-t) * score
    assert x["kl_sum"].abs().max() < 1e-6 and (x["old_values"] == 0).all()
    for i in range(batch.rows):
        L = int(mask[i].sum())
        expected = torch.tensor([0.95 ** (L - 1 - t) for t in range(L)]) * x["score"][i]
        torch.testing.assert_close(x["returns"][i][mask[i]], expected)
    model.train()
    loss, metrics = PPOObjective(config).loss(model, batch)
    assert abs(float(metrics["val/ratio"]) - 1) < 1e-5 and float(metrics["policy/approxkl"]) < 1e-10
    assert float(metrics["policy/clipfrac"]) == 0 and float(metrics["val/clipfrac"]) == 0
    assert {"objective/kl", "objective/scores", "objective/rlhf_reward", "loss/policy", "loss/value",
            "objective/non_score_reward", "policy/entropy"} <= set(metrics)
    loss.backward()
    assert model.value_head.weight.grad.abs().sum() > 0


def _fit(policy, config: PPOConfig, run_dir, steps: int, *, tokenizer, checkpoint_interval: int = 0,
         resume=None) -> Trainer:
    model = PolicyWithValue(policy)
    source = ppo_source(model, TRAIN_PROMPTS, tokenizer.encode, digit_fraction, config, tokenizer=tokenizer,
                        rows_per_step=16)
    train = TrainConfig(steps=steps, batch_tokens=16 * 16, micro_batch=8, seq_len=16, eval_interval=0,
                        checkpoint_interval=checkpoint_interval, log_interval=100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    trainer = Trainer(model, PPOObjective(config), optimizer, lambda step: 1.0, source, train, run_dir,
                      quiet=True, tokenizer=tokenizer, model_store=ValueHeadStore())
    if resume is not None:
        trainer.resume(resume)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_raises_the_reward_on_held_out_prompts(tiny, tokenizer, tmp_path, seed):
    policy = tiny(seed)
    before = held_out_reward(policy, tokenizer)
    trainer = _fit(policy, _config(seed), tmp_path, 36, tokenizer=tokenizer)
    after = held_out_reward(policy, tokenizer)
    assert after > before + 0.2, (before, after)
    scores = [r["objective/scores"] for r in trainer.history]
    assert sum(scores[-4:]) > sum(scores[:4])


def test_resume_restores_the_value_head_and_the_buffer(tiny, tokenizer, tmp_path):
    config = _config(2)
    straight = _fit(tiny(3), config, tmp_path / "a", 6, tokenizer=tokenizer)
    _fit(tiny(3), config, tmp_path / "b", 3, tokenizer=tokenizer, checkpoint_interval=3)
    assert (tmp_path / "b/checkpoints/step-000003" / ValueHeadStore.FILE).is_file()
    resumed = _fit(tiny(3), config, tmp_path / "b", 6, tokenizer=tokenizer, checkpoint_interval=3,
                   resume=tmp_path / "b/checkpoints/step-000003")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]


def test_config_is_checked():
    with pytest.raises(RolloutError, match="kl_estimator"):
        PPOConfig(kl_estimator="k2").validate()
    with pytest.raises(RolloutError, match="gamma and lam"):
        PPOConfig(lam=1.5).validate()
