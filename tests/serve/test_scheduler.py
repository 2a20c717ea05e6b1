"""The engine thread: jobs in, token batches out, cancellation, the queue bound, draining on stop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lmforge.infer.sampling import SamplingParams
from lmforge.serve.scheduler import Accepted, EngineWorker, NotAccepting, QueueFull, Rejected, Tokens

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


async def drain(job) -> tuple[object, dict[int, list[int]]]:
    """The job's first message and, if accepted, every choice's token ids."""
    first = await job.queue.get()
    if not isinstance(first, Accepted):
        return first, {}
    return first, await read_tokens(job)


async def read_tokens(job) -> dict[int, list[int]]:
    """Every choice's token ids, until each has finished."""
    tokens: dict[int, list[int]] = {i: [] for i in range(job.size)}
    open_choices = job.size
    while open_choices:
        batch = await job.queue.get()
        assert isinstance(batch, Tokens)
        tokens[batch.choice] += [e.token_id for e in batch.events]
        open_choices -= batch.events[-1].finish_reason is not None
    return tokens


def test_jobs_get_the_engines_own_tokens_and_leave_nothing_behind(engine_factory):
    reference = engine_factory(max_batch_size=4)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12], [13, 14, 15]]
    expected = [[e.token_id for e in reference.generate(p, GREEDY)] for p in prompts]
    worker = EngineWorker("tiny", engine_factory(max_batch_size=4), max_queue=8)

    async def main():
        jobs = [worker.submit([p], [GREEDY]) for p in prompts[:3]]
        jobs.append(worker.submit(prompts[3:], [GREEDY] * 3))  # one job, three choices
        return await asyncio.gather(*(drain(j) for j in jobs))

    results = asyncio.run(main())
    got = [r[1][0] for r in results[:3]] + [results[3][1][i] for i in range(3)]
    assert got == expected  # six requests through four slots, batched, each its own greedy reply
    assert results[3][0].prompt_tokens == [1, 2, 3]
    assert worker.outstanding == 0 and not worker.engine.sequences and not worker.engine.has_unfinished()
    worker.stop(5)


def test_an_engine_refusal_is_reported_and_frees_the_slots(engine_factory):
    worker = EngineWorker("tiny", engine_factory(max_seq_len=32))

    async def main():
        too_long = worker.submit([[1] * 20, [1, 2]], [SamplingParams(max_tokens=20)] * 2)
        return await drain(too_long)

    first, _ = asyncio.run(main())
    assert isinstance(first, Rejected) and "context is 32 tokens" in str(first.error)
    assert worker.outstanding == 0 and not worker.engine.sequences
    worker.stop(5)


def test_cancel_frees_the_cache_and_the_queue_is_bounded(engine_factory):
    worker = EngineWorker("tiny", engine_factory(max_batch_size=2, max_seq_len=512), max_queue=1)
    long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def main():
        jobs = [worker.submit([[1, 2]], [long]) for _ in range(3)]  # 2 running + 1 waiting: full
        with pytest.raises(QueueFull, match="limit is 3"):
            worker.submit([[3]], [long])
        for job in jobs:
            assert isinstance(await job.queue.get(), Accepted)
        await jobs[0].queue.get()  # a token: it runs
        for job in jobs:
            worker.cancel(job)
        assert worker.outstanding == 0  # the admission slots are free at once
        for _ in range(200):  # the engine thread frees the cache at its next step
            if all(job.done for job in jobs):
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    engine = worker.engine
    assert worker.outstanding == 0 and not engine.has_unfinished() and not engine.sequences
    assert not engine.cache._slot_of  # every KV-cache slot is free again
    worker.stop(5)


def test_stop_finishes_what_was_accepted_then_refuses(engine_factory):
    worker = EngineWorker("tiny", engine_factory())

    async def main():
        job = worker.submit([[1, 2, 3]], [SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)])
        assert isinstance(await job.queue.get(), Accepted)
        stopper = threading.Thread(target=worker.stop, args=(10,))
        stopper.start()  # while the job is generating
        tokens = await read_tokens(job)
        stopper.join()
        with pytest.raises(NotAccepting):
            worker.submit([[1]], [GREEDY])
        return tokens

    tokens = asyncio.run(main())
    assert len(tokens[0]) == 120  # the reply was finished, not cut off
    assert not worker.alive()


def test_a_cancelled_job_gives_its_slot_back_before_the_engine_next_steps(engine_factory):
    """Issue 12, item 8 (test_errors' full-queue test failed 2 runs in 5): a cancelled stream's
    slot came back only when the engine thread finished its current step, so a request sent
    right after the cancel, while a slow step was still running, got a 429."""
    engine = engine_factory(max_batch_size=1, max_seq_len=512)
    in_step, let_step_finish = threading.Event(), threading.Event()
    step = engine.step

    def slow_step():  # hold the engine inside a step until the test has cancelled and resubmitted
        in_step.set()
        let_step_finish.wait(10)
        return step()

    engine.step = slow_step
    worker = EngineWorker("tiny", engine, max_queue=0)  # room for exactly one request
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        first = worker.submit([[1, 2]], [long])
        assert isinstance(await first.queue.get(), Accepted)
        assert await asyncio.to_thread(in_step.wait, 10)
        worker.cancel(first)
        second = worker.submit([[3, 4]], [GREEDY])  # before the fix: QueueFull ("limit is 1")
        let_step_finish.set()
        return await drain(second)

    accepted, tokens = asyncio.run(main())
    assert isinstance(accepted, Accepted) and len(tokens[0]) == GREEDY.max_tokens
    assert worker.outstanding == 0 and not engine.has_unfinished() and not engine.sequences
    worker.stop(5)
