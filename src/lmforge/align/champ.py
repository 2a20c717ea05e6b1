"""Real preference data from CHAMP (competition maths, MIT): human-annotated pairs and judged transcripts.

`champ-dataset==1.0.0` on PyPI ships its whole dataset (`champ_dataset/dataset_files/v0.json`):
270 problems, each with a gold answer, 540 model solutions annotated by humans with their
first wrong step ("fws_annotations"; no step means no mistake), and 72 recorded conversations
per problem (4 models x 18 prompt settings: 19,440 transcripts). The wheel is fetched once
through lmforge.hub (sha256-pinned, no package code run) and turned into three JSONL files
under ``cache_dir()/samples/preferences/``, conversational rows that `read_preferences` reads:

- ``champ-pairs``: the 42 problems whose two annotated solutions split into one without a
  mistake (chosen) and one with a wrong step (rejected).
- ``champ-transcripts``: pairs made from the transcripts by correctness against the gold
  answer (the rule below): every distinct correct solution of a problem against every
  distinct wrong one.
- ``champ-kto``: the same judged transcripts, unpaired, labelled correct or not (for KTO).

Every row's prompt is CHAMP's own: its system message and "Solve the following problem ..."
with the problem alone, whatever hints the annotated solution was written with.

Judging a transcript (there are no correctness labels; this is a rule, and it abstains):
1. Only problems whose gold answer is one number ("239", "-1/2", "0 pairs",
   "100 (i.e., all values)": a number, then words or a parenthesis without digits): 126.
2. Only transcripts whose prompt was the problem alone (no hint, concept or partial
   solution in it), with no error flag, ending in the model's one-sentence summary, which
   CHAMP asked for ("Now, summarize the answer above in one sentence ...").
3. The summary's numbers (thousands commas removed, compared as fractions), less those the
   problem statement itself contains: correct if the gold number is among them and no other
   new number is; wrong if the gold number is absent and some other new number is stated;
   otherwise (hedged, or no number given) the transcript is not used.
The chosen/rejected completion is the model's worked solution (the message before the
summary), not the summary.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write
from lmforge.hub import PyPIFile, SampleError, announce, cache_dir, fetch_pypi_file

__all__ = ["CHAMP", "PREFERENCE_SAMPLES", "PreferenceSample", "champ_rows", "gold_number", "judge_summary",
           "preference_sample_counts", "preference_sample_path"]

CHAMP = PyPIFile("champ-dataset", "champ_dataset-1.0.0-py3-none-any.whl",
                 "aa59df5ae28e2ec76a401a46faf3d6395920be8009a01ce451f7d5c131d82201")
_MEMBER = "champ_dataset/dataset_files/v0.json"
SYSTEM = "You are an expert on mathematics."
INSTRUCTION = "Solve the following problem. Make sure to show your work before giving the final answer.\n\n"
_NUMBER = r"-?\d+(?:\.\d+)?(?:/\d+)?"


@dataclass(frozen=True)
class PreferenceSample:
    name: str
    description: str


PREFERENCE_SAMPLES: dict[str, PreferenceSample] = {s.name: s for s in (
    PreferenceSample("champ-pairs", "CHAMP: 42 human-annotated pairs, a solution without a mistake against "
                                    "one with a wrong step, same problem (MIT)"),
    PreferenceSample("champ-transcripts", "CHAMP: model transcripts judged against the gold answer, correct "
                                          "against wrong solutions of the same problem (MIT)"),
    PreferenceSample("champ-kto", "CHAMP: the judged transcripts unpaired, labelled correct or not (MIT)"),
)}


# ============================================================================ judging
def _value(text: str) -> Fraction | None:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def gold_number(answer: str) -> Fraction | None:
    """The gold answer as a number when it is one ("239", "0 pairs", "100 (i.e., all values)"), else None."""
    match = re.fullmatch(rf"\s*({_NUMBER})\s*(?:\([^0-9]*\)|[A-Za-z ]*)\s*\.?\s*", answer)
    return _value(match.group(1)) if match else None


def _numbers(text: str) -> set[Fraction]:
    found = (_value(n) for n in re.findall(_NUMBER, re.sub(r"(?<=\d),(?=\d{3})", "", text)))
    return {n for n in found if n is not None}


def judge_summary(summary: str, gold: Fraction, problem: str) -> bool | None:
    """True (states the gold number and no other new one), False (states another, not the gold), None."""
    stated = _numbers(summary)
    new = stated - _numbers(problem)
    if gold in stated and new <= {gold}:
        return True
    if gold not in stated and new:
        return False
    return None


# ============================================================================ rows
def _prompt(problem: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": INSTRUCTION + problem}]


def _reply(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text.strip()}]


def _annotated_pairs(problems: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for pid, problem in problems.items():
        notes = problem["fws_annotations"].values()
        right = [n["text"] for n in notes if n["start_idx"] is None]
        wrong = [n["text"] for n in notes if n["start_idx"] is not None]
        if right and wrong:
            yield {"id": pid, "prompt": _prompt(problem["_text"]), "chosen": _reply(right[0]),
                   "rejected": _reply(wrong[0])}


def _judged(problem: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Distinct (correct, wrong) solutions among the problem's plain-prompt transcripts (module docstring)."""
    gold = gold_number(problem["_answer"])
    right: list[str] = []
    wrong: list[str] = []
    if gold is None:
        return right, wrong
    plain = INSTRUCTION + problem["_text"]
    for conversation in problem["conversations"].values():
        messages = conversation["messages"]
        if (len(messages) != 5 or messages[1]["role"] != "User" or messages[1]["text"] != plain
                or any(m["error"] for m in messages) or not messages[2]["role"].startswith("Model.")):
            continue
        verdict = judge_summary(messages[4]["text"], gold, problem["_text"])
        solution = messages[2]["text"].strip()
        side = right if verdict else wrong if verdict is False else None
        if side is not None and solution and solution not in side:
            side.append(solution)
    return right, wrong


def champ_rows(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The three samples' rows from CHAMP's parsed v0.json."""
    problems = data["problems"]
    rows: dict[str, list[dict[str, Any]]] = {"champ-pairs": list(_annotated_pairs(problems)),
                                             "champ-transcripts": [], "champ-kto": []}
    for pid, problem in problems.items():
        right, wrong = _judged(problem)
        prompt = _prompt(problem["_text"])
        for chosen in right:
            rows["champ-transcripts"] += [{"id": pid, "prompt": prompt, "chosen": _reply(chosen),
                                           "rejected": _reply(rejected)} for rejected in wrong]
        rows["champ-kto"] += [{"id": pid, "prompt": prompt, "completion": _reply(text), "label": label}
                              for label, side in ((True, right), (False, wrong)) for text in side]
    return rows


# ============================================================================ the cached files
def _sample_file(name: str) -> Path:
    return cache_dir() / "samples" / "preferences" / f"{name}.jsonl"


def preference_sample_path(name: str, *, quiet: bool = False) -> Path:
    """``cache_dir()/samples/preferences/<name>.jsonl``, all three written on first use (the wheel is then
    deleted)."""
    if name not in PREFERENCE_SAMPLES:
        raise SampleError(f"unknown preference sample {name!r}; known: {', '.join(PREFERENCE_SAMPLES)}")
    target = _sample_file(name)
    if target.exists():
        return target
    announce(f"fetching the CHAMP preference samples (PyPI {CHAMP.filename}) ...", quiet)
    wheel = fetch_pypi_file(CHAMP, quiet=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            rows = champ_rows(json.loads(archive.read(_MEMBER)))
    except (zipfile.BadZipFile, KeyError, TypeError, ValueError) as err:
        raise SampleError(f"{CHAMP.filename} does not hold what the CHAMP samples expect: {err!r}") from err
    for sample, lines in rows.items():
        path = _sample_file(sample)
        with atomic_write(path.with_suffix(".counts.json"), "w") as out:  # first: the .jsonl marks completion
            out.write(json.dumps({"source": CHAMP.filename, "rows": len(lines)}) + "\n")
        with atomic_write(path, "w") as out:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in lines)
    wheel.unlink(missing_ok=True)
    return target


def preference_sample_counts(name: str, *, quiet: bool = False) -> dict[str, Any]:
    """{"source", "rows"} of sample `name` (built if needed)."""
    preference_sample_path(name, quiet=quiet)
    return json.loads(_sample_file(name).with_suffix(".counts.json").read_text())
