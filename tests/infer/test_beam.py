"""Beam search: exact on a small vocabulary, width 1 is greedy, and it matches transformers."""

import itertools

import pytest
import torch

from lmforge.infer.beam import beam_search
from lmforge.infer.engine import Engine
from lmforge.infer.runner import ModelRunner
from lmforge.infer.sampling import SamplingParams


def test_width_one_is_greedy(tiny):
    model = tiny()
    [best] = beam_search(ModelRunner(model), [1, 2, 3], width=1, max_tokens=8)
    greedy = Engine(model).complete([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8))[0].token_ids
    assert best.token_ids == greedy and best.finish_reason == "length"


def test_a_beam_as_wide_as_the_vocabulary_finds_the_most_probable_replies(tiny):
    model = tiny(vocab_size=7)
    prompt = [1, 2]
    hyps = beam_search(ModelRunner(model), prompt, width=7, max_tokens=3, length_penalty=0.0)
    # brute force: the total log-probability of all 343 three-token replies
    replies = torch.tensor(list(itertools.product(range(7), repeat=3)))
    ids = torch.cat([torch.tensor(prompt).expand(len(replies), 2), replies], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, 1:-1], -1)
    totals = logp.gather(-1, replies[..., None]).squeeze(-1).sum(-1)
    best = totals.topk(7)
    assert [h.token_ids for h in hyps] == replies[best.indices].tolist()
    assert [h.logprob for h in hyps] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_finished_hypotheses_use_the_length_penalty(tiny):
    model = tiny()
    runner = ModelRunner(model)
    free = beam_search(runner, [1, 2, 3], width=3, max_tokens=6)
    stop = free[0].token_ids[1]  # make the best reply's second token an end token
    hyps = beam_search(runner, [1, 2, 3], width=3, max_tokens=6, stop_ids={stop}, length_penalty=0.5)
    finished = [h for h in hyps if h.finish_reason == "stop"]
    assert finished and all(h.token_ids[-1] == stop for h in finished)
    for h in hyps:
        assert h.score == pytest.approx(h.logprob / len(h.token_ids) ** 0.5)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_beam_search_matches_transformers_on_smollm2(smollm2, hf_smollm2):
    ids = smollm2.tokenizer.encode("The capital of France is")
    engine = Engine(smollm2.model, smollm2.tokenizer)  # no end tokens: every beam runs to max_tokens
    ours = engine.beam_search(ids, width=3, max_tokens=8)
    theirs = hf_smollm2.generate(torch.tensor([ids]), num_beams=3, num_return_sequences=3, do_sample=False,
                                 max_new_tokens=8, eos_token_id=None, pad_token_id=0, early_stopping=False)
    assert [h.token_ids for h in ours] == theirs[:, len(ids):].tolist()
