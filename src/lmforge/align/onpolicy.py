"""On-policy preference pairs: the model answers each problem several times, a verifier grades
the answers, and a right one is paired with a wrong one.

Off-the-shelf preference data was written by other models (or people), so DPO on it
pushes the policy toward text it would never produce. Pairs sampled from the policy
itself are on its own distribution, and the verifier (the task's checker: the answer
extracted and compared with the gold one) replaces the human labeller. A problem whose
samples are all right or all wrong carries no preference and is skipped: the number kept
is reported, since it says how much signal the model's current accuracy leaves.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from lmforge.align.preferences import PreferencePair
from lmforge.align.rollout import RolloutConfig, sample_rollouts
from lmforge.eval.verifiable import Problem, Task

CHUNK = 16  # problems sampled per engine run (progress between runs)


def onpolicy_pairs(model: nn.Module, tokenizer: Any, task: Task, problems: Sequence[Problem], *, samples: int,
                   max_new_tokens: int, temperature: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = (),
                   quiet: bool = False) -> tuple[list[PreferencePair], dict[str, Any]]:
    """(pairs, stats): for each problem with a right and a wrong answer among `samples`, one pair.

    The chosen answer is the first right one, the rejected the first wrong one (in sampling
    order, which the seeds fix). Stats: problems, pairs, the sampled accuracy, tokens/s.
    """
    if samples < 2:
        raise ValueError(f"on-policy pairs need at least 2 samples per problem, got {samples}")
    config = RolloutConfig(samples_per_prompt=samples, prompts_per_rollout=CHUNK,
                           max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    pairs: list[PreferencePair] = []
    right = total = tokens = 0
    started = time.perf_counter()
    for begin in range(0, len(problems), CHUNK):
        chunk = list(problems[begin:begin + CHUNK])
        seeds = [seed * 1_000_003 + (begin + i) * samples + j
                 for i in range(len(chunk)) for j in range(samples)]
        prompt_ids = [tokenizer.encode_chat_prompt(p.prompt) for p in chunk]
        rollouts = sample_rollouts(model, chunk, prompt_ids, config, seeds, tokenizer=tokenizer,
                                   stop_ids=stop_ids)
        tokens += rollouts.completion_tokens
        for i, problem in enumerate(chunk):
            texts = rollouts.texts[i * samples:(i + 1) * samples]
            correct = [task.grade(problem, text).correct for text in texts]
            right, total = right + sum(correct), total + len(correct)
            good = next((t for t, ok in zip(texts, correct) if ok), None)
            bad = next((t for t, ok in zip(texts, correct) if not ok), None)
            if good is not None and bad is not None:
                pairs.append(PreferencePair(prompt=list(problem.prompt),
                                            chosen=[{"role": "assistant", "content": good}],
                                            rejected=[{"role": "assistant", "content": bad}]))
        if not quiet:
            done = min(begin + CHUNK, len(problems))
            speed = tokens / (time.perf_counter() - started)
            print(f"\ronpolicy: {done}/{len(problems)} problems, {len(pairs)} pairs, {speed:.0f} tok/s",
                  end="", file=sys.stderr, flush=True)
    if not quiet:
        print(file=sys.stderr, flush=True)
    stats = {"onpolicy_problems": len(problems), "onpolicy_pairs": len(pairs),
             "onpolicy_sampled_accuracy": right / total if total else 0.0,
             "onpolicy_seconds": round(time.perf_counter() - started, 1)}
    return pairs, stats
