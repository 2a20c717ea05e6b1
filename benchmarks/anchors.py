"""The anchors: the implementations the benchmarks run lmforge against, and how to get them.

They are not lmforge's dependencies. pyproject.toml's `bench` extra installs them
(`pip install -e '.[bench]'`), except llama-cpp-python, which `make llamacpp` builds
for this CPU. A benchmark calls `require(...)` with what the parts it is about to run
import (including what an anchor imports at run time without declaring it), so a
missing one ends the run with one line that says what to install, not a traceback
from deep inside a run. tests/benchmarks/test_imports.py checks that every import of
every benchmark is either lmforge's own dependency or named here and declared.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

#: import name -> distribution name, where the two differ
DISTRIBUTIONS = {
    "cchardet": "faust-cchardet",
    "faiss": "faiss-cpu",
    "magic": "python-magic",
    "llama_cpp": "llama-cpp-python",
    "yaml": "pyyaml",
}

#: distributions that no extra installs, and how to get them instead
BUILT = {"llama-cpp-python": "make llamacpp (builds it for this CPU)",
         # llm-compressor pins an older transformers than the bench extra's: its own environment
         "llmcompressor": "make refquant (its own environment, .venv-refquant)",
         "compressed-tensors": "make refquant (its own environment, .venv-refquant)"}


def distribution(module: str) -> str:
    """The distribution that installs top-level module `module`."""
    return DISTRIBUTIONS.get(module, module.replace("_", "-"))


def missing(modules: tuple[str, ...]) -> list[str]:
    """The modules of `modules` that cannot be imported (a library that loads but lacks its
    system part, like python-magic without libmagic, counts as missing)."""
    absent = []
    for module in modules:
        try:
            importlib.import_module(module)
        except (ImportError, OSError):
            absent.append(module)
    return absent


def require(*modules: str, skip_hint: str = "") -> None:
    """Exit with one line naming what to install if any of `modules` cannot be imported."""
    absent = missing(modules)
    if not absent:
        return
    names = sorted({distribution(module) for module in absent})
    how = [BUILT[name] for name in names if name in BUILT]
    if len(how) < len(names):
        how.insert(0, "pip install -e '.[bench]' (the benchmark anchors)")
    script = Path(sys.argv[0]).name or "benchmark"
    hint = f"; or {skip_hint}" if skip_hint else ""
    raise SystemExit(f"{script}: missing {', '.join(names)}: install with {' and '.join(how)}{hint}")
