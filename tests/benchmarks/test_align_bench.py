"""The alignment benchmark compares like with like: the same tokens counted, the same DPO rows and losses.

benchmarks/bench_align.py times lmforge's rollouts against transformers' `generate` and a
DPO step against trl's `DPOTrainer` on SmolLM2; these tests run the benchmark's own
contender functions on a tiny random Llama with a byte tokenizer (tests/align/conftest.py),
so what the benchmark counts and compares is checked in seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from bench_align import (
    compare_dpo,
    dpo_recipe,
    generated_lengths,
    left_pad,
    lmforge_batch_digests,
    lmforge_rollouts,
    run_lmforge_dpo,
    run_trl_dpo,
    transformers_rollouts,
    trl_batch_digests,
)
from bench_finetune import initial_adapter
from tests.align.conftest import byte_tokenizer, save_hf_folder, tiny_llama

from lmforge.align.preferences import PreferencePair, PreferenceSource
from lmforge.infer.loading import load_model
from lmforge.model.checkpoint import load_checkpoint
from lmforge.train.batch import IGNORE_INDEX

transformers = pytest.importorskip("transformers")

EOS = 256  # the byte tokenizer's <|endoftext|>, also its pad id
QUESTIONS = ["What is 2 + 3?", "Compute 17 * 4 - 9, please.", "Is 91 prime?"]
PAIRS = [{"prompt": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": f"What is {i} + {i + 1}?"}],
          "chosen": [{"role": "assistant", "content": f"{2 * i + 1}"}],
          "rejected": [{"role": "assistant", "content": f"It is {2 * i + 2}" + "!" * (i % 3)}]}
         for i in range(6)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny random Llama and the byte tokenizer as a Hugging Face folder, which both sides load."""
    return save_hf_folder(tiny_llama(0), tmp_path_factory.mktemp("bench-align") / "base")


@pytest.fixture(scope="module")
def both_models(folder):
    loaded = load_model(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [loaded.tokenizer.encode_chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: left padding is exercised
    return loaded, theirs, prompts


# ============================================================================ rollouts
def test_generated_lengths_counts_up_to_and_including_the_first_stop():
    new = torch.tensor([[5, 7, 9, 2, 2],     # stop 9 at index 2, then padding (2, itself a stop id)
                        [5, 6, 7, 8, 1],     # no stop: the whole row
                        [2, 2, 2, 2, 2],     # stops at once
                        [4, 9, 2, 9, 2]])    # the first stop counts, not a later one
    assert generated_lengths(new, [9, 2]) == [3, 5, 1, 2]
    assert generated_lengths(new, []) == [5, 5, 5, 5]


def test_left_padding_right_aligns_the_prompts():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_rollouts_are_the_same_tokens_and_counts_on_both_sides(both_models):
    """Greedy, both sides must produce the very same tokens; a stop token picked from the first row's
    reply (so rows stop at different points, some never) ends the rows at the same place on both."""
    loaded, theirs, prompts = both_models
    free = lmforge_rollouts(loaded.model, loaded.tokenizer, prompts, samples=1, max_new_tokens=12,
                            temperature=0.0, stop_ids=[])
    first_row = free.completions[0]
    stop = next(t for i, t in enumerate(first_row) if i >= 3 and t not in first_row[:i])
    stop_ids = [stop, EOS]
    ours = lmforge_rollouts(loaded.model, loaded.tokenizer, prompts, samples=2, max_new_tokens=12,
                            temperature=0.0, stop_ids=stop_ids)
    anchor = transformers_rollouts(theirs, prompts, samples=2, max_new_tokens=12, temperature=0.0,
                                   stop_ids=stop_ids, pad_id=EOS)
    assert ours.completions == anchor.completions
    assert ours.lengths == anchor.lengths and ours.tokens == anchor.tokens
    assert ours.lengths[0] == ours.lengths[1] == first_row.index(stop) + 1  # k samples of prompt 0 adjacent
    assert ours.stopped(stop_ids) == anchor.stopped(stop_ids) >= 2


def test_sampled_rollouts_count_each_row_to_its_stop_on_both_sides(both_models):
    """At temperature 1 the samples differ, but both sides count the same thing: each row's tokens up
    to and including its first stop, or max_new_tokens of them; never `generate`'s padding."""
    loaded, theirs, prompts = both_models
    stop_ids = [EOS, *range(0, 256, 4)]  # a quarter of the bytes stop a row: most rows stop early
    for run in (lmforge_rollouts(loaded.model, loaded.tokenizer, prompts, samples=3, max_new_tokens=10,
                                 temperature=1.0, stop_ids=stop_ids, seed=1),
                transformers_rollouts(theirs, prompts, samples=3, max_new_tokens=10, temperature=1.0,
                                      stop_ids=stop_ids, pad_id=EOS, seed=1)):
        assert len(run.completions) == 9
        for row in run.completions:
            stops = [i for i, t in enumerate(row) if t in stop_ids]
            assert (stops == [len(row) - 1]) if stops else (len(row) == 10)
        assert run.stopped(stop_ids) > 0 and run.tokens < 9 * 10
        assert run.tokens_per_s > 0


# ============================================================================ DPO
def _trl_style_batch(batch) -> dict[str, torch.Tensor]:
    """A pair batch laid out as trl's collator lays it out: [chosen; rejected] rows, attention and
    completion masks."""
    e = batch.extras
    ids = torch.cat([batch.input_ids, e["rejected_ids"]])
    labels = torch.cat([batch.labels, e["rejected_labels"]])
    lengths = torch.cat([e["chosen_length"], e["rejected_length"]])
    completion = torch.zeros_like(ids)
    completion[:, 1:] = (labels[:, :-1] != IGNORE_INDEX).long()
    return {"input_ids": ids, "attention_mask": (torch.arange(ids.shape[1]) < lengths[:, None]).long(),
            "completion_mask": completion}


def test_batch_digests_see_tokens_completion_spans_and_order():
    source = PreferenceSource.from_examples(byte_tokenizer(), [PreferencePair(**r) for r in PAIRS], 128,
                                            shuffle=False)
    batch = source.batch([0, 1, 2])
    trl_like = _trl_style_batch(batch)
    assert trl_batch_digests(trl_like) == lmforge_batch_digests(batch)
    moved = {k: v.clone() for k, v in trl_like.items()}
    first = int(moved["completion_mask"][0].nonzero()[0])
    moved["completion_mask"][0, first] = 0  # the completion starts one token later
    assert trl_batch_digests(moved) != lmforge_batch_digests(batch)
    assert lmforge_batch_digests(source.batch([1, 0, 2])) != lmforge_batch_digests(batch)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_both_dpo_sides_train_on_the_same_rows_with_the_same_losses(folder, tmp_path, method):
    """The benchmark's two contenders, a few steps on the tiny Llama: identical token rows and completion
    masks at every step, ln 2 at the first step on both, and the same losses after identical updates."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    from bench_align import DPOSettings

    steps, settings = 3, DPOSettings(rows=2, max_length=64, beta=0.1)
    recipe = dpo_recipe(method, steps, lr=1e-2 if method == "lora" else 1e-3)
    init = initial_adapter(load_checkpoint(folder)[0], recipe) if recipe.adapter else None
    ours = run_lmforge_dpo(folder, recipe, settings, PAIRS, init, tmp_path / "lmforge")
    theirs = run_trl_dpo(folder, recipe, settings, PAIRS, init, tmp_path / "trl")
    checks = compare_dpo(ours, theirs)  # raises unless the rows are the same
    assert len(ours["digests"]) == steps and len(ours["digests"][0]) == 2 * settings.rows
    assert ours["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert theirs["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert checks["first_logps_chosen_rel_diff"] < 1e-5 and checks["first_logps_rejected_rel_diff"] < 1e-5
    assert checks["max_loss_rel_diff"] < 1e-4, (ours["losses"], theirs["losses"])
    assert abs(ours["losses"][-1] - math.log(2)) > 1e-3  # the weights moved: later steps compare updates
    assert ours["trainable_parameters"] == theirs["trainable_parameters"]
    assert len(ours["step_seconds"]) == len(theirs["step_seconds"]) == steps
    # a run on the same pairs in another order is refused, not compared
    pairs = [PreferencePair(**r) for r in PAIRS[1:] + PAIRS[:1]]
    rotated = PreferenceSource.from_examples(byte_tokenizer(), pairs, settings.max_length, shuffle=False)
    rows = settings.rows
    shifted = ours | {"digests": [lmforge_batch_digests(rotated.batch(range(i * rows, (i + 1) * rows)))
                                  for i in range(steps)]}
    with pytest.raises(AssertionError, match="different token rows"):
        compare_dpo(shifted, theirs)
