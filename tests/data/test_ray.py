"""`prepare` and `tokenize` on a Ray cluster of two nodes (separate `ray start` processes on
this machine) write what the local executor writes, and a Ray worker killed mid-task is
retried without losing or doubling a document."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.executors import LocalRayCluster, RayExecutor
from lmforge.data.pipeline import prepare
from lmforge.data.shards import open_shard
from lmforge.data.tokenize_tasks import tokenize_files

from .test_pipeline import config, corpus, documents, reference  # noqa: F401 - fixtures, shared

ray = pytest.importorskip("ray", reason="the Ray executor's tests need ray: pip install 'lmforge[ray]'")


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, one CPU each, torn down by pid (never `ray stop`)."""
    with LocalRayCluster(nodes=2, cpus=1, object_store_bytes=100_000_000) as running:
        yield running


@pytest.fixture(scope="module")
def executor(cluster):
    with RayExecutor(cluster.address) as connected:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield connected


def comparable(report) -> dict:
    """What must not depend on the executor: every count, without the times."""
    data = report.to_dict()
    for stage in data["stages"]:
        stage.pop("seconds")
    return {k: data[k] for k in ("stages", "docs_read", "docs_written", "chars_written", "output_files",
                                 "shards", "input_files")}


def test_ray_writes_what_the_local_executor_writes(corpus, reference, executor, tmp_path):  # noqa: F811
    local_report, expected = reference
    report = prepare([corpus], tmp_path, config(), executor=executor)
    assert comparable(report) == comparable(local_report)
    got, want = documents(tmp_path), documents(expected)
    assert got == want  # same documents kept, same text (redactions included), same metadata
    assert report.task_peak_mb["filter"] > 0 and report.task_peak_mb["dedup"] > 0


def _ray_workers_running(cluster: LocalRayCluster, task: str) -> list[int]:
    found = []
    for pid in cluster.pids():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"ray::{task}".encode()):
                found.append(pid)
        except OSError:
            pass
    return found


def test_a_killed_ray_worker_loses_nothing_and_doubles_nothing(corpus, reference, cluster, executor,  # noqa: F811
                                                               tmp_path):
    """SIGKILL the worker process running a filter task; Ray runs the task again, and the
    output is an uninterrupted run's: every document once."""
    _, expected = reference
    killed: list[int] = []
    stop = threading.Event()

    def kill_one() -> None:
        while not stop.is_set() and not killed:
            for pid in _ray_workers_running(cluster, "filter_shard"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        report = prepare([corpus], tmp_path, config(), executor=executor)
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray worker was caught running a filter task"
    got, want = documents(tmp_path), documents(expected)
    assert got == want
    assert len({d.id for d in got}) == len(got) == report.docs_written
    assert not list(tmp_path.rglob("*.tmp"))


def test_tokenize_on_ray_writes_the_same_shards(reference, executor, smollm2_gguf, tmp_path):  # noqa: F811
    _, prepared = reference
    local = tokenize_files([prepared], smollm2_gguf, tmp_path / "local", shard_mb=0.05)
    remote = tokenize_files([prepared], smollm2_gguf, tmp_path / "ray", executor=executor, shard_mb=0.05)
    assert remote.splits == local.splits and local.splits["train"].tokens > 1000
    names = sorted(p.name for p in (tmp_path / "local").glob("*.safetensors"))
    assert names and names == sorted(p.name for p in (tmp_path / "ray").glob("*.safetensors"))
    for name in names:  # same arrays (the header's metadata order varies: safetensors keeps it in a HashMap)
        a, b = open_shard(tmp_path / "ray" / name), open_shard(tmp_path / "local" / name)
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.doc_starts, b.doc_starts)
        assert a.tokens.dtype == b.tokens.dtype
