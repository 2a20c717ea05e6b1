"""Curriculum learning: difficulty scores, pacing, the easiest-first sampler and exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import ConfigKeyError
from lmforge.data.shards import TokenShard, load_shard_set
from lmforge.model.checkpoint import load_checkpoint
from lmforge.train.batch import Batch
from lmforge.train.curriculum import (
    Curriculum,
    CurriculumConfig,
    CurriculumError,
    length_scores,
    pacing_fraction,
    perplexity_scores,
    rarity_scores,
    window_scores,
)
from lmforge.train.data import DataError, TokenWindows
from lmforge.train.pretrain import pretrain

from .tiny_run import tiny_config


def _shard(tokens, doc_starts) -> TokenShard:
    return TokenShard(path=Path("crafted.safetensors"), tokens=np.asarray(tokens, dtype=np.uint16),
                      doc_starts=np.asarray(doc_starts, dtype=np.int64))


def _documents(lengths: list[int], make=lambda i, n: [i % 7 + 1] * n) -> TokenShard:
    tokens, starts = [], []
    for i, n in enumerate(lengths):
        starts.append(len(tokens))
        tokens.extend(make(i, n))
    return _shard(tokens, starts)


# ------------------------------------------------------------------------------ pacing
@pytest.mark.parametrize("kind", ["linear", "root", "step", "geometric"])
def test_pacing_starts_at_start_ends_at_one_and_never_shrinks(kind):
    grid = np.linspace(0, 1, 201)
    values = [pacing_fraction(kind, t, 0.1, stages=4) for t in grid]
    assert values[0] == pytest.approx(0.1) and values[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert pacing_fraction(kind, 7.0, 0.1) == pytest.approx(1.0)  # past the ramp: everything


def test_pacing_shapes():
    mid = {kind: pacing_fraction(kind, 0.5, 0.1) for kind in ("linear", "root", "geometric")}
    assert mid["linear"] == pytest.approx(0.55)
    assert mid["root"] == pytest.approx(math.sqrt(0.01 + 0.99 * 0.5))  # widens fastest early
    assert mid["geometric"] == pytest.approx(math.sqrt(0.1))  # stays narrow longest
    assert mid["root"] > mid["linear"] > mid["geometric"]
    plateaus = {round(pacing_fraction("step", t, 0.1, stages=4), 9) for t in np.linspace(0, 1, 101)}
    assert plateaus == {0.1, 0.4, 0.7, 1.0}


# ------------------------------------------------------------------------------ scores
@pytest.mark.parametrize("bos_align", [True, False])
def test_length_scores_are_the_mean_document_length_under_each_window(bos_align):
    lengths = [3, 40, 12, 5, 25, 9, 30, 4, 18]
    shard = _documents(lengths)
    windows = TokenWindows([shard], seq_len=7, seed=0, bos_align=bos_align)
    per_token = np.repeat(lengths, lengths).astype(float)  # each token's document length
    expected = [per_token[s:s + 8].mean() for s in windows.starts]
    np.testing.assert_allclose(length_scores(windows), expected)
    if bos_align:  # a window from a short document (followed by its neighbours) scores below a long one
        scores = dict(zip(windows.starts.tolist(), length_scores(windows)))
        assert scores[0] < scores[3] == max(scores.values())  # 3 tokens then a 40-token document
        assert scores[124] < scores[94]  # 4 tokens then 18, against 30


def test_rarity_scores_rank_common_tokens_easiest():
    # a very common token 1, a medium token 2, and rare ids 10..40
    rare = list(range(10, 41))
    tokens = [1] * 64 + [2] * 16 + [1, 2] * 8 + rare[:16] + [1] * 16 + rare[16:]
    shard = _shard(tokens, [0])
    windows = TokenWindows([shard], seq_len=15, seed=0)
    scores = rarity_scores(windows)
    counts = np.bincount(np.asarray(tokens))
    cost = -np.log((counts + 1) / (counts.sum() + len(counts)))
    expected = [cost[np.asarray(tokens[s:s + 16])].mean() for s in windows.starts]
    np.testing.assert_allclose(scores, expected)
    assert scores[0] == scores.min()  # all common tokens
    rare_share = [np.mean(np.asarray(tokens[s:s + 16]) >= 10) for s in windows.starts]
    assert np.argmax(scores) == np.argmax(rare_share) and max(rare_share) > 0.6


def test_perplexity_scores_follow_a_trained_scorer(shards, tmp_path):
    summary = pretrain(tiny_config(shards, tmp_path / "scorer", "train.steps=25", "train.eval_interval=0"),
                       quiet=True)
    _, train = load_shard_set(shards, "train")
    text = np.asarray(train[0].tokens[:33 * 8], dtype=np.uint16)
    noise = np.random.default_rng(0).integers(0, 384, 33 * 8).astype(np.uint16)
    windows = TokenWindows([_shard(np.concatenate([text, noise]), [0])], seq_len=32, seed=0, shuffle=False)
    scores = perplexity_scores(windows, summary["checkpoint"], batch=5)
    model, _ = load_checkpoint(summary["checkpoint"])
    with torch.no_grad():
        batch = torch.from_numpy(np.stack([windows._window(k) for k in range(len(windows))]))
        logits = model(batch[:, :-1]).logits
        direct = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    np.testing.assert_allclose(scores, direct.mean(dim=1).double().numpy(), rtol=1e-5)
    assert scores[:8].max() < scores[8:].min()  # real text is easier than random tokens

    too_wide = TokenWindows([_shard(np.full(200, 5000, dtype=np.uint16), [0])], seq_len=32, seed=0)
    with pytest.raises(CurriculumError, match="beyond the scorer's vocabulary of 384"):
        perplexity_scores(too_wide, summary["checkpoint"])


def test_scores_are_cached_by_data_and_score(tmp_path):
    windows = TokenWindows([_documents([5, 30, 8, 20, 3, 12])], seq_len=4, seed=0)
    cache = tmp_path / "scores.safetensors"
    first = window_scores(windows, CurriculumConfig(score="length"), cache=cache)
    assert cache.exists()
    again = window_scores(windows, CurriculumConfig(score="length"), cache=cache)
    np.testing.assert_array_equal(again, first)
    rarity = window_scores(windows, CurriculumConfig(score="rarity"), cache=cache)  # another key: recomputed
    np.testing.assert_allclose(rarity, rarity_scores(windows))


# ------------------------------------------------------------------------------ the sampler
def _numbered_windows(n_windows: int, seq_len: int = 4, seed: int = 0) -> TokenWindows:
    """Window k starts with token k * seq_len, so a batch row names its window."""
    tokens = np.arange(n_windows * seq_len + 1)
    return TokenWindows([_shard(tokens, [0])], seq_len=seq_len, seed=seed)


def _drawn(batch: Batch, seq_len: int = 4) -> list[int]:
    return (batch.input_ids[:, 0] // seq_len).tolist()


@pytest.mark.parametrize("pacing", ["linear", "root", "step", "geometric"])
def test_sampler_draws_only_from_the_allowed_easiest_windows(pacing):
    n, ramp = 200, 600
    windows = _numbered_windows(n)
    scores = (np.arange(n) * 7919 % n).astype(float)  # a scrambled difficulty per window
    config = CurriculumConfig(score="length", pacing=pacing, start=0.1)
    curriculum = Curriculum(scores, config, ramp_draws=ramp, seed=0)
    windows.use_curriculum(curriculum)
    rank = np.argsort(np.argsort(scores))  # window -> its place in the easiest-first order
    drawn = [k for _ in range(ramp // 20) for k in _drawn(windows.next_batch(20))]
    for step, k in enumerate(drawn):
        allowed = curriculum.allowed(step)
        assert rank[k] < allowed and -1e-6 < allowed - pacing_fraction(pacing, step / ramp, 0.1) * n < 1
    assert curriculum.allowed(0) == 20 and curriculum.allowed(ramp - 1) >= 199
    after = [k for _ in range(10) for k in _drawn(windows.next_batch(20))]  # past the ramp: plain epochs
    assert sorted(after) == list(range(n))


def test_a_pool_is_drawn_uniformly():
    windows = _numbered_windows(200)
    config = CurriculumConfig(score="length", pacing="step", start=0.1)  # a flat first plateau
    windows.use_curriculum(Curriculum(np.arange(200.0), config, ramp_draws=10**9, seed=1))
    drawn = _drawn(windows.next_batch(1000))
    counts = np.bincount(drawn, minlength=200)
    assert counts[20:].sum() == 0 and counts[:20].min() > 25  # every one of the easiest 20, ~50 times each


def test_curriculum_draws_are_seeded_and_resume_exactly():
    def make(seed: int = 3) -> TokenWindows:
        windows = _numbered_windows(150, seed=seed)
        scores = np.repeat(np.arange(15.0), 10)  # ties, broken by the seed
        windows.use_curriculum(Curriculum(scores, CurriculumConfig(score="length", start=0.2), 100, seed))
        return windows

    a = make()
    before = [a.next_batch(8) for _ in range(7)]
    position = a.state_dict()
    after = [a.next_batch(8) for _ in range(40)]  # crosses the end of the ramp (100) and an epoch (150)
    b = make()
    assert all(torch.equal(x.input_ids, b.next_batch(8).input_ids) for x in before)
    c = make()
    c.load_state_dict(json.loads(json.dumps(position)))
    assert all(torch.equal(x.input_ids, c.next_batch(8).input_ids) for x in after)
    assert not all(torch.equal(x.input_ids, make(seed=4).next_batch(8).input_ids) for x in before)

    plain = _numbered_windows(150, seed=3)
    with pytest.raises(DataError, match="drawn with curriculum .* but this run has none"):
        plain.load_state_dict(position)
    with pytest.raises(DataError, match="drawn with no curriculum"):
        make().load_state_dict(plain.state_dict())
    with pytest.raises(DataError, match="before the first batch"):
        plain.next_batch(1)
        plain.use_curriculum(Curriculum(np.zeros(150), CurriculumConfig(score="length"), 10, 3))


# ------------------------------------------------------------------------------ pretraining
CURRICULUM = ["data.curriculum.score=length", "data.curriculum.pacing=root", "data.curriculum.start=0.25",
              "train.steps=20", "train.checkpoint_interval=10", "train.eval_interval=10",
              "train.eval_batches=2", "deterministic=true"]


def _curve(output: Path) -> list[tuple]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r.get("val_loss")) for r in records]


def test_pretrain_with_a_curriculum_resumes_exactly(shards, tmp_path):
    straight = tmp_path / "straight"
    pretrain(tiny_config(shards, straight, *CURRICULUM), quiet=True)
    assert (straight / "curriculum-scores.safetensors").exists()
    checkpoint = straight / "checkpoints" / "step-000010"
    state = json.loads((checkpoint / "trainer_state" / "state.json").read_text())
    assert state["data"]["drawn"] == 10 * 1024 // 64 and state["data"]["curriculum"]

    resumed = tmp_path / "resumed"  # a fresh folder (no score cache), from the straight run's step 10
    pretrain(tiny_config(shards, resumed, *CURRICULUM, f"resume={checkpoint}"), quiet=True)
    assert _curve(resumed) == _curve(straight)[10:]

    plain = tmp_path / "plain"
    pretrain(tiny_config(shards, plain, *CURRICULUM[3:]), quiet=True)
    assert _curve(plain)[0][1] != _curve(straight)[0][1]  # the curriculum changed what was drawn


def test_curriculum_config_errors_name_the_key(shards, tmp_path):
    with pytest.raises(ConfigKeyError, match="'data.curriculum.pace'"):
        tiny_config(shards, tmp_path, "data.curriculum.pace=root")
    with pytest.raises(ConfigKeyError, match="data.curriculum.pacing must be one of"):
        tiny_config(shards, tmp_path, "data.curriculum.pacing=cubic")
    with pytest.raises(CurriculumError, match="needs data.curriculum.scorer"):
        pretrain(tiny_config(shards, tmp_path, "data.curriculum.score=perplexity"), quiet=True)
    with pytest.raises(CurriculumError, match=r"start must be in \(0, 1\]"):
        pretrain(tiny_config(shards, tmp_path, "data.curriculum.score=length", "data.curriculum.start=0"),
                 quiet=True)
