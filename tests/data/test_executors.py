"""Executors: a clear one-line error without Ray, and per-task peak memory that is really per task."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.data.errors import ExecutorError
from lmforge.data.executors import LocalExecutor, TaskMemory, make_executor

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


def test_ray_executor_without_ray_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ExecutorError, match=r"pip install 'lmforge\[ray\]'"):
        make_executor("ray")
    (tmp_path / "a.txt").write_text("Some words to prepare.")
    code = main(["prepare", str(tmp_path / "a.txt"), "-o", str(tmp_path / "out"), "--executor", "ray", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "lmforge[ray]" in err, err
    with pytest.raises(ExecutorError, match="workers"):
        LocalExecutor(0)


def test_local_executor_runs_every_job_once():
    with LocalExecutor(2) as pool:
        assert sorted(r["n"] for r in pool.map(_square, list(range(7)))) == [n * n for n in range(7)]
    assert list(LocalExecutor(1).map(_square, [3])) == [{"n": 9}]


def _square(n: int) -> dict:
    return {"n": n * n}


@linux_only
def test_task_memory_is_reset_for_each_task():
    """A 200 MB task, then a small one in the same process: the second reports its own peak."""
    with TaskMemory() as big:
        block = np.ones(200 * 2**20 // 8)
        del block
    with TaskMemory() as small:
        np.ones(2**20 // 8).sum()
    assert big.peak_mb - big.start_mb > 150
    assert small.peak_mb - small.start_mb < 50
    assert set(small.to_dict()) == {"rss_start_mb", "rss_peak_mb"}
