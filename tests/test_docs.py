"""The docs reproduce: every relative link in README.md and docs/*.md resolves (file and
`#anchor`), and a sample of the numbers on the pages is recomputed from the current code,
cheaply: the scaling planner's output, the curriculum's pacing table, the transformer's
parameter and FLOP counts, the tokenizer pages' console sessions, and the smallest run of
the scaling sweep's table (seconds), whose validation loss must match to 0.01."""

from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


# ------------------------------------------------------------------------------ markdown
def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fence = [], None
    for line in text.splitlines():
        marker = line.lstrip()[:3]
        if marker in ("```", "~~~"):
            fence = None if fence == marker else (fence or marker)
            continue
        if fence is None:
            lines.append(line)
    return lines


def code_blocks(text: str) -> list[list[str]]:
    """The lines of every fenced code block, in order."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line.strip())
    return blocks


def github_slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (but `-`, `_`), spaces -> `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(page: Path) -> list[str]:
    text = "\n".join(re.sub(r"`[^`]*`", "", line) for line in prose_lines(page.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_github_slugs():
    assert github_slug("RoPE: rotary position embeddings (Llama, Qwen2, Mistral, Mixtral)") == \
        "rope-rotary-position-embeddings-llama-qwen2-mistral-mixtral"
    assert github_slug("Reading crawls and files; bad input") == "reading-crawls-and-files-bad-input"
    assert github_slug("`lmforge export`") == "lmforge-export"
    assert github_slug("Compute: C ≈ 6ND") == "compute-c--6nd"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


# ------------------------------------------------------------------------------ commands
def run_cli(capsys, argv: list[str]) -> list[str]:
    """`lmforge ARGV` in this process; its stdout lines, right-stripped."""
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        assert main(argv) == 0, f"lmforge {shlex.join(argv)} failed: {capsys.readouterr().err}"
    finally:
        torch.set_num_threads(threads)
    return [line.rstrip() for line in capsys.readouterr().out.splitlines()]


def assert_lines_in_order(shown: list[str], printed: list[str], what: str) -> None:
    """Every line the docs show ("..." skipped) appears in the printed lines, in order."""
    rest = iter(printed)
    for line in shown:
        if line in ("...", ""):
            continue
        assert any(line.strip() == out.strip() for out in rest), \
            f"{what}: the docs show {line!r}, the code prints {printed}"


def test_scaling_plan_outputs(capsys, monkeypatch):
    """scaling.md's `scaling plan` and `scaling sweep --dry-run` sessions (no training)."""
    monkeypatch.chdir(ROOT)
    text = (DOCS / "scaling.md").read_text(encoding="utf-8")
    sessions = [b for b in code_blocks(text) if b and (b[0].startswith("$ lmforge scaling plan")
                                                      or b[0].endswith("--dry-run"))]
    assert len(sessions) >= 2
    for block in sessions:
        argv = shlex.split(block[0].removeprefix("$ lmforge "))
        assert_lines_in_order(block[1:], run_cli(capsys, argv), block[0])
    out = run_cli(capsys, ["scaling", "plan", "--params", "135M", "--tokens", "2T"])
    assert "prints C = 1.62e21" in text and "1.620e+21" in out[1]


def test_curriculum_pacing_table():
    from lmforge.train.curriculum import pacing_fraction

    text = (DOCS / "curriculum.md").read_text(encoding="utf-8")
    header = "| t | linear | root | step (4) | geometric |"
    rows = text[text.index(header):].splitlines()[2:7]
    for row in rows:
        t, *shown = [cell.strip() for cell in row.strip("|").split("|")]
        want = [f"{pacing_fraction(kind, float(t), 0.1, 4):.2f}"
                for kind in ("linear", "root", "step", "geometric")]
        assert shown == want, f"pacing at t={t}"


def test_transformer_counts():
    from lmforge.model.config import ModelConfig, preset

    text = (DOCS / "transformer.md").read_text(encoding="utf-8")
    gpt2, smol = preset("gpt2"), preset("smollm2-135m")
    mixtral = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                          max_seq_len=32768, position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False,
                          out_bias=False, mlp_bias=False, norm_bias=False, n_experts=8, tie_embeddings=False)
    numbers = [gpt2.num_parameters(), smol.num_parameters(), gpt2.num_parameters(include_embeddings=False),
               smol.num_parameters(include_embeddings=False), mixtral.num_parameters(),
               mixtral.active_parameters()]
    for config, seq_len in ((gpt2, 1024), (smol, 1024), (smol, 8192)):
        numbers += [int(config.flops_per_token(seq_len, training=False)),
                    int(config.flops_per_token(seq_len, training=True))]
    missing = [f"{n:,}" for n in numbers if f"{n:,}" not in text]
    assert not missing, f"transformer.md lacks the current counts {missing}"
    assert f"{preset('llama-tiny').num_parameters():,} parameters" in (DOCS / "checkpoints.md").read_text()


def test_tokenizer_console_sessions(capsys, tmp_path, monkeypatch, smollm2_gguf):
    """Replay tokenizer.md's `$ lmforge tokenizer ...` sessions that show output."""
    import functools

    import lmforge.tokenizer.cli as tokenizer_cli

    monkeypatch.chdir(tmp_path)
    opened = functools.cache(tokenizer_cli.open_tokenizer)  # SmolLM2's is opened (and proven) once

    def open_once(spec: str):
        return opened(str(Path(spec).resolve()) if Path(spec).exists() else spec)

    monkeypatch.setattr(tokenizer_cli, "open_tokenizer", open_once)
    replayed = 0
    for block in code_blocks((DOCS / "tokenizer.md").read_text(encoding="utf-8")):
        commands = [i for i, line in enumerate(block) if line.startswith("$ ")]
        for n, i in enumerate(commands):
            line = block[i][2:]
            shown = block[i + 1:commands[n + 1] if n + 1 < len(commands) else len(block)]
            if line.startswith("printf "):
                text, target = shlex.split(line)[1:][0], shlex.split(line)[-1]
                Path(target).write_text(text)
                continue
            command, _, grep = line.partition(" | grep ")
            if not shown or not command.startswith("lmforge tokenizer") or "|" in grep:
                continue
            printed = run_cli(capsys, shlex.split(command)[1:])
            if grep:
                printed = [out for out in printed if grep in out]
            assert_lines_in_order(shown, printed, line)
            replayed += 1
    assert replayed >= 7


def _sweep_commands() -> list[str]:
    text = (DOCS / "scaling.md").read_text(encoding="utf-8")
    block = next(b for b in code_blocks(text) if b and b[0].startswith("S="))
    return " ".join(block).replace("\\ ", " ").split("lmforge ")[1:]


def _expand(command: str, sources: Path, runs: Path) -> list[str]:
    command = command.replace("$S", str(sources)).replace("runs/", f"{runs}/")
    argv: list[str] = []
    for word in shlex.split(command.replace("configs/", f"{ROOT}/configs/")):
        argv += sorted(glob.glob(word)) if "*" in word else [word]
    return argv


@pytest.mark.slow
def test_the_smallest_sweep_run_reproduces(capsys, tmp_path, python_docs):
    """scaling.md's commands at the table's smallest grid point: the same N, D, steps, rate,
    FLOPs, and the validation loss within 0.01 (other CPUs may round differently)."""
    train, tokenize, sweep = (_expand(c, python_docs / "_sources", tmp_path) for c in _sweep_commands()[:3])
    verbs = [train[:2], tokenize[:1], sweep[:2]]
    assert verbs == [["tokenizer", "train"], ["tokenize"], ["scaling", "sweep"]], "scaling.md's block changed"
    run_cli(capsys, [*train, "-q"])
    run_cli(capsys, [*tokenize, "-q"])
    sweep[sweep.index("--sizes") + 1] = "32x2"
    sweep[sweep.index("--tokens") + 1] = "50K"
    run_cli(capsys, [*sweep, f"--data.folder={tmp_path}/shards/pydocs-512", "-q"])
    record = json.loads((tmp_path / "scaling" / "results.jsonl").read_text().splitlines()[0])
    table = (DOCS / "scaling.md").read_text(encoding="utf-8").splitlines()
    row = next(line for line in table if line.startswith("| d32-l2-t50K |"))
    _, non_emb, total, tokens, steps, lr, flops, val_loss = (c.strip() for c in row.strip("|").split("|"))
    assert (non_emb, total, tokens, steps, flops) == (
        f"{record['non_embedding_params']:,}", f"{record['params']:,}", f"{record['tokens']:,}",
        str(record["steps"]), f"{record['flops']:.2e}")
    assert float(lr) == pytest.approx(record["lr"])
    assert record["val_loss"] == pytest.approx(float(val_loss), abs=0.01)
