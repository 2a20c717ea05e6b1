"""Every benchmark runs in a fresh `pip install -e '.[bench]'`: its imports are declared.

A benchmark's imports are read with `ast` (never executed), in functions too. Each one is
the standard library, lmforge itself, another file of benchmarks/, one of lmforge's own
dependencies, or an anchor: named in the benchmark's `ANCHORS` (so its `require(...)`
ends a run without it in one line) and declared in pyproject.toml's `bench` or `dev`
extra, or built by a Makefile target (llama-cpp-python: `make llamacpp`).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import anchors
import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("bench_*.py"))
LOCAL = {path.stem for path in (ROOT / "benchmarks").glob("*.py")}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(*extras: str) -> set[str]:
    specs = [s for extra in extras for s in PROJECT["optional-dependencies"][extra]] if extras \
        else PROJECT["dependencies"]
    return {canonical(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]) for spec in specs}


def third_party_imports(path: Path) -> set[str]:
    """Top-level modules `path` imports anywhere, less the stdlib, lmforge and benchmarks/."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - LOCAL - {"lmforge", "__future__"}


def declared_anchors(path: Path) -> tuple[str, ...]:
    """The benchmark's module-level `ANCHORS` tuple, read without importing the benchmark."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "ANCHORS":
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path.name} has no module-level ANCHORS tuple")


def test_every_benchmark_is_checked():
    assert {p.name for p in BENCHMARKS} >= {"bench_data_pipeline.py", "bench_decode.py", "bench_train.py",
                                             "bench_serve.py", "bench_tokenizer_train.py",
                                             "bench_tokenizer_encode.py"}


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_imports_are_dependencies_or_declared_anchors(path: Path):
    runtime = declared()
    anchors_of = set(declared_anchors(path))
    for module in sorted(third_party_imports(path)):
        dist = canonical(anchors.distribution(module))
        if dist in runtime:
            continue
        assert module in anchors_of, (f"{path.name} imports {module} ({dist}), which is no lmforge "
                                      "dependency: name it in ANCHORS and require() it")


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_anchors_are_installable(path: Path):
    extras = declared("bench", "dev")
    built = {canonical(name) for name in anchors.BUILT}
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for module in declared_anchors(path):
        dist = canonical(anchors.distribution(module))
        if dist in built:
            target = anchors.BUILT[anchors.distribution(module)].split()[1]
            assert f"\n{target}:" in makefile, f"{dist} should be built by `make {target}`"
            continue
        assert dist in extras | declared(), f"{path.name}: anchor {module} ({dist}) is in no extra"
    if declared_anchors(path):
        assert "require(" in path.read_text(encoding="utf-8"), f"{path.name} never calls require()"


def test_the_bench_extra_alone_covers_the_anchors():
    """`pip install -e '.[bench]'` (without dev) is enough to run every benchmark."""
    bench, runtime = declared("bench"), declared()
    built = {canonical(name) for name in anchors.BUILT}
    for path in BENCHMARKS:
        for module in declared_anchors(path):
            dist = canonical(anchors.distribution(module))
            assert dist in bench | runtime | built, f"{path.name}: {dist} is not in the bench extra"


def test_a_missing_anchor_ends_the_run_in_one_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "argv", ["bench_x.py"])
    with pytest.raises(SystemExit) as caught:
        anchors.require("json", "no_such_anchor_module")
    message = str(caught.value.code)
    assert "\n" not in message
    assert message == ("bench_x.py: missing no-such-anchor-module: install with pip install -e '.[bench]' "
                       "(the benchmark anchors)")
    monkeypatch.setitem(anchors.DISTRIBUTIONS, "no_such_binding", "llama-cpp-python")
    with pytest.raises(SystemExit, match=r"missing llama-cpp-python: install with make llamacpp .*; or "
                                         r"pass --skip-llamacpp$"):
        anchors.require("no_such_binding", skip_hint="pass --skip-llamacpp")
    anchors.require("json")  # present: nothing happens
