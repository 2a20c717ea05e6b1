"""`lmforge prepare` on its executors: local processes (1 and 2 workers) and Ray (head + 1 node).

The same run three times in one process, on the ``web`` sample (Debian handbook pages in
four languages, the Python tutorial and HOWTOs as HTML and reST, two real WARCs; ~9 MB):

- ``local -j1``: every task in this process;
- ``local -j2``: two spawned worker processes;
- ``ray 2 nodes``: a Ray head and a second node, each its own ``ray start`` with one CPU
  (`lmforge.data.executors.LocalRayCluster`), the driver connected as a real cluster's
  would be. The cluster's start (~15 s) is not counted; its workers' first imports are.

Each run reports wall time, documents read per second, the ratio to ``local -j1``, and
the largest per-task peak resident memory of each phase (filter, dedup, finish; a task's
peak is the process's, reset at the task's start). The three outputs must be identical.

    python benchmarks/bench_pipeline_executors.py
    python benchmarks/bench_pipeline_executors.py --only local   # without Ray
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from anchors import require
from machine import announce

from lmforge.data.executors import LocalExecutor, LocalRayCluster, RayExecutor
from lmforge.data.pipeline import PrepareConfig, prepare
from lmforge.data.samples import fetch_data_sample
from lmforge.data.writers import read_documents

ANCHORS = ("ray",)


def run(name: str, sample: Path, out: Path, executor, shards: int) -> dict:
    started = time.perf_counter()
    report = prepare([sample], out, PrepareConfig(shards=shards), executor=executor)
    seconds = time.perf_counter() - started
    texts = [(d.id, d.text) for p in sorted(out.glob("part-*.parquet")) for d in read_documents(p)]
    return {"executor": name, "seconds": round(seconds, 2), "docs_read": report.docs_read,
            "docs_written": report.docs_written, "docs_per_second": round(report.docs_read / seconds, 2),
            "task_peak_mb": report.task_peak_mb, "output": texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="web", help="data sample (see `lmforge data samples`) or folder")
    parser.add_argument("--shards", type=int, default=8, help="input shards (= filter and finish tasks)")
    parser.add_argument("--only", choices=["local", "ray"], help="run one executor kind only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.only != "local":
        require(*ANCHORS, skip_hint="time the local executor alone with --only local")
    machine = announce(("ray", "trafilatura"), file=sys.stderr if args.json else sys.stdout)
    sample = Path(args.sample) if Path(args.sample).exists() else fetch_data_sample(args.sample, quiet=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "ray":
            for workers in (1, 2):
                with LocalExecutor(workers) as executor:
                    results.append(run(f"local -j{workers}", sample, Path(tmp) / f"local{workers}", executor,
                                       args.shards))
        if args.only != "local":
            with LocalRayCluster(nodes=2, cpus=1) as cluster, RayExecutor(cluster.address) as executor:
                results.append(run("ray 2 nodes", sample, Path(tmp) / "ray", executor, args.shards))
    identical = all(r["output"] == results[0]["output"] for r in results)
    for r in results:
        r.pop("output")
        r["ratio_to_local_j1"] = round(results[0]["seconds"] / r["seconds"], 2)
    if args.json:
        print(json.dumps({"machine": machine, "identical_outputs": identical, "runs": results}, indent=2))
        return
    print(f"input: {sample} ({results[0]['docs_read']:,} documents read), {args.shards} shards")
    print(f"{'executor':<12} {'seconds':>8} {'docs/s':>8} {'vs -j1':>7}  "
          "peak MB per task (filter/dedup/finish)")
    for r in results:
        peaks = "/".join(f"{r['task_peak_mb'].get(p, 0):.0f}" for p in ("filter", "dedup", "finish"))
        print(f"{r['executor']:<12} {r['seconds']:>8.1f} {r['docs_per_second']:>8.1f} "
              f"{r['ratio_to_local_j1']:>6.2f}x  {peaks}")
    print(f"outputs identical: {identical}")


if __name__ == "__main__":
    main()
