"""The scorer's shortcuts (duplicates, shared prefixes, padded batches, the head only where scored)
change no score."""

import random

import pytest
import torch
from tests.infer.conftest import VARIANTS, tiny_model

from lmforge.eval.scoring import Scorer, _groups, _Row


def reference(model, tokens, targets):
    """One sequence alone through the plain forward pass: sum log p and greedy."""
    logp = model(torch.tensor([tokens])).logits[0, -len(targets):].float().log_softmax(-1)
    target = torch.tensor(targets)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def requests(seed=0):
    rng = random.Random(seed)
    shared = [rng.randrange(97) for _ in range(40)]
    out = []
    for i in range(14):
        tokens = (shared if i % 2 else []) + [rng.randrange(97) for _ in range(rng.randrange(2, 20))]
        out.append((tokens, [rng.randrange(97) for _ in range(rng.randrange(1, min(4, len(tokens)) + 1))]))
    out.append((out[1][0], [5]))  # the same input, another target: scored from the same row
    return out


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "moe-qknorm"])
def test_scores_equal_one_sequence_at_a_time(variant):
    model = tiny_model(variant, max_seq_len=128)
    reqs = requests()
    got = Scorer(model, batch_tokens=90, min_shared=8).score(reqs)
    for (tokens, targets), (logp, greedy) in zip(reqs, got):
        want_logp, want_greedy = reference(model, tokens, targets)
        assert logp == pytest.approx(want_logp, abs=1e-4)
        assert greedy == want_greedy


def test_shared_prefixes_are_grouped_before_the_first_scored_position():
    rows = [_Row(tuple(range(50)) + (i,), [(i, [1])]) for i in range(3)] + [_Row((7, 8, 9), [(3, [1])])]
    groups, alone = _groups(rows, min_shared=32)
    assert [(shared, len(members)) for shared, members in groups] == [(50, 3)]
    assert [r.tokens for r in alone] == [(7, 8, 9)]
    # a row whose scored part starts inside the common prefix limits the group's prefix
    rows[0].requests = [(0, [1] * 20)]
    groups, _ = _groups(rows[:3], min_shared=8)
    assert groups[0][0] == 51 - 20


def test_progress_and_bad_requests():
    model = tiny_model("llama-gqa", max_seq_len=64)
    seen = []
    Scorer(model).score([([1, 2, 3], [4]), ([5, 6], [7])], progress=lambda *counts: seen.append(counts))
    assert seen[-1] == (2, 2)
    with pytest.raises(ValueError, match="targets"):
        Scorer(model).score([([1], [2, 3])])
