"""One thread per model runs its `Engine`; the asyncio server talks to it through queues.

The engine is synchronous and step-based: `add_request`, then `step()` again and again,
each step decoding one token for every running request (continuous batching). A server
must keep answering HTTP while the model computes, so each model gets one *engine
thread* that owns its `Engine` exclusively and steps it whenever there is work. PyTorch
and lmforge's C kernels release the GIL while they compute, so the event loop stays
responsive.

```
event loop (many requests)                          engine thread (one per model)
  submit(job) ── inbox (thread-safe queue) ──▶        add_request for each choice
  cancel(job) ──────────────────────────────▶        cancel + release (frees its KV cache)
                                                      step() -> TokenEvents
  job.queue (asyncio.Queue) ◀── call_soon_threadsafe ─ grouped per job, once per step
```

A *job* is one HTTP request: one or more engine requests (choices: `n` replies, or
several prompts), one asyncio queue that receives, in order: `Accepted` (or `Rejected`
with the engine's reason), then `Tokens` batches, each choice ending with an event that
has a `finish_reason`; or `Failed` if the engine broke. The number of engine requests
admitted but not finished is bounded (`max_batch_size + max_queue`), so a flood of
requests is refused at once (`QueueFull`) rather than queued without end.

A job holds its admission slots until each choice finishes, or until `cancel`, which
gives them back at once, on the caller's side: the engine frees the KV cache at its next
step, but a request that arrives in between is admitted (and waits in the engine's queue
for that step) instead of being refused for a slot that is already being given back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmforge.infer.engine import Engine, TokenEvent
from lmforge.infer.sampling import SamplingParams

logger = logging.getLogger("lmforge.serve")


class QueueFull(RuntimeError):
    """The model already has as many requests as it will accept."""


class NotAccepting(RuntimeError):
    """The worker is shutting down (or its thread died)."""


# Messages from the engine thread to a job's asyncio queue.
@dataclass
class Accepted:
    prompt_tokens: list[int]  # per choice, after any truncation by the engine


@dataclass
class Rejected:
    error: Exception  # from add_request: the request cannot be served as asked


@dataclass
class Tokens:
    choice: int
    events: list[TokenEvent]
    at: float  # time.perf_counter() when the step produced them


@dataclass
class Failed:
    error: Exception  # the engine raised during a step: the job cannot continue


@dataclass(eq=False)
class Job:
    """One HTTP request's work: a prompt and sampling parameters per choice."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = 0
    submitted_at: float = 0.0
    engine_ids: list[int] = field(default_factory=list)  # engine-thread only
    open_choices: int = 0  # engine-thread only: choices not yet finished
    done: bool = False  # set by the engine thread when no choice is still running
    held: int = 0  # admission slots this job still holds (guarded by the worker's lock)

    @property
    def size(self) -> int:
        return len(self.prompts)


class EngineWorker:
    """Owns one `Engine` and the thread that runs it."""

    def __init__(self, name: str, engine: Engine, *, max_queue: int = 256) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.name = name
        self.engine = engine
        self.capacity = engine.max_batch_size + max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outstanding = 0  # engine requests submitted and not finished (guarded by _lock)
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._by_engine_id: dict[int, tuple[Job, int]] = {}  # engine-thread only
        self._ids = itertools.count(1)
        self.started_at = time.time()

    # ------------------------------------------------------------------ event-loop side
    @property
    def max_model_len(self) -> int:
        return self.engine.context

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def running(self) -> int:
        """Requests in the engine's running batch (read without locking: for metrics only)."""
        return len(self.engine.running)

    def start(self) -> None:
        """Start the engine thread; after `stop`, start a new one (an app's lifespan can run
        again, e.g. under a test client). Without it `submit` starts the thread once."""
        with self._lock:
            old = self._thread
        if old is not None and old.is_alive() and not self._accepting:
            old.join()  # still draining from a stop: let it end first
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._accepting = True
                self._thread = threading.Thread(target=self._run, name=f"lmforge-engine-{self.name}",
                                                daemon=True)
                self._thread.start()

    def alive(self) -> bool:
        return self._accepting and (self._thread is None or self._thread.is_alive())

    def submit(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Job:
        """Queue a job; its asyncio queue receives its results. Call from the event loop."""
        if len(prompts) != len(params) or not prompts:
            raise ValueError("a job needs one SamplingParams per prompt, and at least one prompt")
        job = Job([list(p) for p in prompts], list(params), asyncio.get_running_loop())
        if self._thread is None:  # an app used without running its lifespan
            self.start()
        with self._lock:
            if not self.alive():
                raise NotAccepting(f"model {self.name!r} is shutting down")
            if self._outstanding + job.size > self.capacity:
                raise QueueFull(f"model {self.name!r} has {self._outstanding} requests in progress or "
                                f"waiting, its limit is {self.capacity}; retry later")
            self._outstanding += job.size
            job.held = job.size
        job.id = next(self._ids)
        job.submitted_at = time.perf_counter()
        self._inbox.put(("add", job))
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job's generation (the client left): its admission slots are free at once, its
        KV cache at the engine's next step. Safe to repeat."""
        self._release(job)
        if not job.done:
            self._inbox.put(("cancel", job))

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, let the engine finish the ones it has, then end the thread."""
        with self._lock:
            self._accepting = False
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._inbox.put(("stop", None))
            thread.join(timeout)

    # ------------------------------------------------------------------ engine-thread side
    def _run(self) -> None:
        # Inference mode for everything the engine does here, not only its forward passes: a
        # KV cache grown inside a forward pass holds inference tensors, which `cancel` (freeing
        # the slot in place) may otherwise not touch.
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        stopping = False
        try:
            while True:
                idle = not self.engine.has_unfinished()
                if stopping and idle:
                    return
                try:  # wait for work when idle; otherwise only take what has already arrived
                    command = self._inbox.get(block=idle)
                except queue.Empty:
                    command = None
                while command is not None:
                    kind, job = command
                    if kind == "add":
                        self._add(job)
                    elif kind == "cancel":
                        self._cancel(job)
                    else:
                        stopping = True
                    try:
                        command = self._inbox.get_nowait()
                    except queue.Empty:
                        command = None
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as err:  # a bug: fail everything in flight rather than leave clients hanging
            logger.exception("engine thread for %s stopped", self.name)
            with self._lock:
                self._accepting = False
            error = RuntimeError(f"the engine for {self.name!r} stopped: {err}")
            for job in {job for job, _ in self._by_engine_id.values()}:
                self._fail(job, error)
            while True:  # and the jobs that had not reached the engine yet
                try:
                    kind, job = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    self._release(job)
                    job.done = True
                    self._deliver(job, Failed(error))

    def _deliver(self, job: Job, message: object) -> bool:
        try:
            job.loop.call_soon_threadsafe(job.queue.put_nowait, message)
            return True
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            return False

    def _release(self, job: Job, n: int | None = None) -> None:
        """Give back `n` of the job's admission slots (all it holds when None); a slot is given
        back once, whether its choice finished or the job was cancelled first."""
        with self._lock:
            n = job.held if n is None else min(n, job.held)
            job.held -= n
            self._outstanding -= n

    def _add(self, job: Job) -> None:
        added: list[int] = []
        try:
            for prompt, params in zip(job.prompts, job.params):
                added.append(self.engine.add_request(prompt, params))
        except Exception as err:  # GenerationError and the like: the request as asked cannot run
            for rid in added:
                self.engine.cancel(rid)
                self.engine.release(rid)
            job.done = True
            self._release(job)
            self._deliver(job, Rejected(err))
            return
        job.engine_ids = added
        job.open_choices = len(added)
        for choice, rid in enumerate(added):
            self._by_engine_id[rid] = (job, choice)
        prompt_tokens = [len(self.engine.sequences[rid].prompt_ids) for rid in added]
        if not self._deliver(job, Accepted(prompt_tokens)):
            self._cancel(job)

    def _cancel(self, job: Job) -> None:
        for rid in job.engine_ids:
            if self._by_engine_id.pop(rid, None) is not None:
                self.engine.cancel(rid)
                self.engine.release(rid)
                job.open_choices -= 1
                self._release(job, 1)
        job.done = True

    def _fail(self, job: Job, error: Exception) -> None:
        for rid in job.engine_ids:
            if self._by_engine_id.pop(rid, None) is not None:
                try:
                    self.engine.cancel(rid)
                    self.engine.release(rid)
                except Exception:  # the engine is already broken; the job is failed either way
                    pass
                self._release(job, 1)
        job.done = True
        self._deliver(job, Failed(error))

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as err:
            # The engine ends a request it cannot fit (a paged cache too small) and raises;
            # fail the jobs whose requests it ended, keep serving the others.
            logger.warning("engine step for %s failed: %s", self.name, err)
            broken = {job for rid, (job, _) in self._by_engine_id.items()
                      if rid not in self.engine.sequences or self.engine.sequences[rid].finished}
            for job in broken:
                self._fail(job, err)
            if not broken:
                raise
            return
        now = time.perf_counter()
        grouped: dict[tuple[int, int], tuple[Job, list[TokenEvent]]] = {}
        finished: list[int] = []
        for event in events:
            entry = self._by_engine_id.get(event.request_id)
            if entry is None:  # cancelled meanwhile
                continue
            job, choice = entry
            grouped.setdefault((job.id, choice), (job, []))[1].append(event)
            if event.finish_reason is not None:
                finished.append(event.request_id)
        for rid in finished:
            job, _ = self._by_engine_id.pop(rid)
            self.engine.release(rid)
            self._release(job, 1)
            job.open_choices -= 1
            if job.open_choices == 0:
                job.done = True
        for (_, choice), (job, batch) in grouped.items():
            if not self._deliver(job, Tokens(choice, batch, now)):
                self._cancel(job)
