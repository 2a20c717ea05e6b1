"""Where the data pipeline's tasks run: local worker processes, or a Ray cluster.

Every phase of `prepare` and `tokenize` is a list of *tasks*, each a plain picklable
job handed to a module-level function that reads its inputs from files in the output
folder and writes its outputs there (atomically, then a done marker). Nothing passes
between tasks in memory, so an executor only has to run ``work(job)`` somewhere and
hand back the small result dict; the stage code is the same whichever executor runs it.

- `LocalExecutor`: the calling process (one worker) or a pool of spawned processes
  that die with the main process (Linux ``PR_SET_PDEATHSIG``).
- `RayExecutor`: one ``ray.remote`` task per job with ``max_retries``: when a worker
  process or a node dies, Ray runs the task again elsewhere. Since a task's output
  depends only on its job and its renamed files replace any earlier copy whole, a
  retried task writes the same bytes, and nothing is lost or written twice. Ray is an
  optional dependency (``pip install 'lmforge[ray]'``), imported only here, only when
  asked for.

`TaskMemory` measures what one task costs: the peak resident memory of the process
that ran it, reset at the task's start (Linux ``/proc/self/clear_refs``), so a pooled
worker that ran a big task before reports this task's peak, not its lifetime's.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from lmforge.data.errors import ExecutorError

Job = TypeVar("Job")
Result = dict[str, Any]
EXECUTORS = ("local", "ray")
RAY_HINT = "pip install 'lmforge[ray]'"


class Executor(Protocol):
    """Runs ``work(job)`` for every job, yielding each result as its task finishes."""

    name: str

    def map(self, work: Callable[[Job], Result], jobs: Sequence[Job]) -> Iterator[Result]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...


# ---------------------------------------------------------------------------- local
def _die_with_parent(parent: int) -> None:
    """Worker initializer: on Linux, ask the kernel to kill this worker when the main
    process dies, so a killed run leaves no orphan writing files.

    A spawned worker gets here only after its imports; if the main process died in the
    meantime the request comes too late (the worker already has a new parent), so the
    worker checks and exits by itself."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


class LocalExecutor:
    """This machine: in the calling process for one worker, else a pool of spawned processes.

    The pool is started at the first multi-task phase and kept for the following ones
    (a single task then runs in it too, not in the caller), so trafilatura and fastText
    load once per worker, not once per phase.
    """

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ExecutorError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def map(self, work: Callable[[Job], Result], jobs: Sequence[Job]) -> Iterator[Result]:
        if self.workers <= 1 or (len(jobs) <= 1 and self._pool is None):
            for job in jobs:
                yield work(job)
            return
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                             mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_die_with_parent, initargs=(os.getpid(),))
        futures = [self._pool.submit(work, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- Ray
class RayExecutor:
    """A Ray cluster: every job is a ``ray.remote`` task with one CPU and `max_retries`.

    `address` is what ``ray.init`` takes: ``auto`` (the cluster this machine belongs to,
    as ``ray start`` left it, or ``$RAY_ADDRESS``), ``HOST:PORT`` of a head node,
    ``ray://HOST:PORT`` (Ray Client), or ``local`` to start a private one-machine Ray
    for this run. Every node must see the output folder and the inputs under the same
    paths (a shared filesystem), and have lmforge installed.
    """

    name = "ray"

    def __init__(self, address: str = "auto", *, max_retries: int = 3) -> None:
        try:
            import ray
        except ImportError:
            raise ExecutorError(f"--executor ray needs Ray, which is not installed: {RAY_HINT}") from None
        self._ray = ray
        self.max_retries = max_retries
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            try:
                ray.init(address=None if address == "local" else address, logging_level="WARNING",
                         log_to_driver=False, configure_logging=False)
            except ConnectionError as err:
                raise ExecutorError(f"no Ray cluster at {address!r} ({err}); start one with `ray start "
                                    "--head` or pass --address local for a private one on this "
                                    "machine") from None

    def map(self, work: Callable[[Job], Result], jobs: Sequence[Job]) -> Iterator[Result]:
        ray = self._ray
        remote = ray.remote(work).options(num_cpus=1, max_retries=self.max_retries, retry_exceptions=False)
        pending = [remote.remote(job) for job in jobs]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield ray.get(ref)  # a task's own error is raised here as its original type
        finally:  # an error, or the caller gave up: no task of this run goes on writing
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._owns_connection and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_executor(kind: str = "local", *, workers: int = 1, address: str = "auto",
                  max_retries: int = 3) -> LocalExecutor | RayExecutor:
    """The executor the CLI's ``--executor`` names."""
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(address, max_retries=max_retries)
    raise ExecutorError(f"unknown executor {kind!r}; choose from {', '.join(EXECUTORS)}")


# ---------------------------------------------------------------------------- task memory
class TaskMemory:
    """``with TaskMemory() as memory: ...`` then ``memory.to_dict()``: the process's resident
    memory when the task started and its peak during the task, in MB (Linux; zeros elsewhere).

    Writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's peak-RSS counter
    (VmHWM) to the current RSS, so the peak read at the end is this task's alone.
    """

    def __init__(self) -> None:
        self.start_mb = 0.0
        self.peak_mb = 0.0

    def __enter__(self) -> TaskMemory:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        self.start_mb = _status_mb("VmRSS")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.peak_mb = max(_status_mb("VmHWM"), self.start_mb)

    def to_dict(self) -> dict[str, float]:
        return {"rss_start_mb": round(self.start_mb, 1), "rss_peak_mb": round(self.peak_mb, 1)}


def _status_mb(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


# ---------------------------------------------------------------------------- a cluster on one machine
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """A Ray head and `nodes - 1` more nodes, each a separate ``ray start`` on this machine,
    as a real cluster's nodes would be: for tests, benchmarks, and trying ``--executor ray``.

    ``with LocalRayCluster(nodes=2) as cluster: RayExecutor(cluster.address)``. Each node
    gets `cpus` CPUs, a small object store and its own ports. Teardown ends only this
    cluster's processes, by pid (those whose command line names its private temp folder,
    and their children): ``ray stop`` would end every Ray on the machine, other users' too.
    """

    def __init__(self, nodes: int = 2, *, cpus: int = 1, object_store_bytes: int = 100_000_000,
                 temp_root: str = "/tmp") -> None:
        import sys
        import tempfile

        self.nodes, self.cpus, self.object_store_bytes = nodes, cpus, object_store_bytes
        self.ray = [sys.executable, "-m", "ray.scripts.scripts"]  # `ray`, of this very Python
        # short: Ray's unix socket paths live under it and must stay under 108 characters
        self.temp = tempfile.mkdtemp(prefix="lmray", dir=temp_root)
        self.address = ""

    def _start(self, *args: str) -> Any:
        import subprocess

        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # explicit, so that a token some earlier `ray.init()` left in ~/.ray does not switch
        # this cluster's nodes to token auth behind the driver's back
        env.setdefault("RAY_AUTH_MODE", "disabled")
        command = [*self.ray, "start", *args, "--num-cpus", str(self.cpus), "--temp-dir", self.temp,
                   "--object-store-memory", str(self.object_store_bytes), "--disable-usage-stats",
                   "--node-ip-address", "127.0.0.1", "--dashboard-agent-listen-port", str(_free_port()),
                   "--min-worker-port", "0", "--max-worker-port", "0"]
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def __enter__(self) -> LocalRayCluster:
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        try:  # the other nodes start beside the head: each waits for the head's GCS by itself
            starts = [self._start("--head", "--port", str(port), "--include-dashboard=false")]
            starts += [self._start("--address", self.address) for _ in range(self.nodes - 1)]
            for start in starts:
                output, _ = start.communicate(timeout=180)
                if start.returncode != 0:
                    raise ExecutorError(f"`ray start` failed: {output.strip()[-2000:]}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> list[int]:
        """This cluster's processes: those naming its temp folder, and their descendants."""
        parents: dict[int, int] = {}
        own: set[int] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[1])
            if self.temp.encode() in cmdline:
                own.add(int(entry.name))
        grown = True
        while grown:
            children = {pid for pid, parent in parents.items() if parent in own} - own
            own |= children
            grown = bool(children)
        return sorted(own)

    def stop(self, grace: float = 2.0) -> None:
        import shutil
        import time

        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self.pids():
                break
        shutil.rmtree(self.temp, ignore_errors=True)
