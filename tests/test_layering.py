"""The house's layering (DESIGN.md): dependencies point down, and no two modules import each other.

Every `import lmforge...` in the source counts, including those inside functions and
under `TYPE_CHECKING`: a deferred import is still a dependency, and hiding a cycle in a
function is how cycles survive.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# package -> the lmforge packages it may import (besides itself). The ground floor
# (atomic, config, hub, formats) may be used by anyone.
GROUND = {"lmforge.atomic", "lmforge.config", "lmforge.hub", "lmforge.formats", "lmforge.cli_parser",
          "lmforge.progress"}
ALLOWED = {
    "lmforge.atomic": set(),
    "lmforge.config": set(),
    "lmforge.hub": {"lmforge.atomic"},
    "lmforge.formats": {"lmforge.atomic"},
    "lmforge.cli_parser": set(),
    "lmforge.progress": set(),
    "lmforge.data": GROUND | {"lmforge.tokenizer"},
    "lmforge.tokenizer": GROUND,
    "lmforge.model": GROUND | {"lmforge.tokenizer"},
    "lmforge.infer": GROUND | {"lmforge.model", "lmforge.tokenizer"},
    "lmforge.train": GROUND | {"lmforge.model", "lmforge.tokenizer", "lmforge.data", "lmforge.infer"},
    "lmforge.tune": GROUND | {"lmforge.model", "lmforge.tokenizer", "lmforge.data", "lmforge.infer",
                              "lmforge.train"},
    "lmforge.eval": GROUND | {"lmforge.model", "lmforge.tokenizer", "lmforge.data", "lmforge.infer"},
    "lmforge.compress": GROUND | {"lmforge.model", "lmforge.tokenizer", "lmforge.data", "lmforge.infer",
                                  "lmforge.eval", "lmforge.train"},  # train: distillation, QAT
    # the encoder and the engine that answers; data: prepare's readers; eval: HotpotQA's answers and metrics
    "lmforge.rag": GROUND | {"lmforge.model", "lmforge.tokenizer", "lmforge.data", "lmforge.infer",
                             "lmforge.eval"},
    "lmforge.serve": GROUND | {"lmforge.model", "lmforge.tokenizer", "lmforge.infer", "lmforge.rag"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lmforge_imports(path: Path) -> set[str]:
    """Modules of lmforge that `path` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lmforge")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmforge"):
            found.add(node.module)
            # `from lmforge.tokenizer import gguf_meta` imports a module, not a name
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if (SRC / node.module.replace(".", "/") / f"{a.name}.py").exists()}
    return found


GRAPH = {module_name(p): lmforge_imports(p) for p in sorted((SRC / "lmforge").rglob("*.py"))}


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def is_command_line(module: str) -> bool:
    """A package's `cli` module is the top floor (DESIGN.md: the CLI may import everything)."""
    return module.endswith(".cli") or ".cli." in module


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependencies_point_down(package):
    wrong = sorted(f"{module} imports {target}" for module, targets in GRAPH.items()
                   if package_of(module) == package and not is_command_line(module) for target in targets
                   if package_of(target) != package and package_of(target) not in ALLOWED[package])
    assert not wrong, "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_two_modules_import_each_other():
    # a package's __init__ that re-exports its modules is not a cycle with them
    graph = {m: {t for t in targets if not (m.startswith(t + ".") and t in GRAPH)}
             for m, targets in GRAPH.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
