"""The batcher alone, with a plain function as the model: dispatch, bucketing, limits, isolation, drain."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from modelpress.errors import InvalidInputError, ModelNotReadyError, RequestTimeoutError, ServerOverloadedError
from modelpress.serving.batching import Batcher
from modelpress.serving.config import BatchConfig

pytestmark = pytest.mark.anyio
HOLD_S = 5  # longest a gated work function waits for the test


class Work:
    """Doubles each row; records batches; ``gate`` holds a call until the test opens it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, rows: list[int]) -> list[int]:
        self.batches.append(list(rows))
        self.entered.set()
        assert self.gate.wait(HOLD_S)
        if any(r < 0 for r in rows):
            raise InvalidInputError("negative row")
        return [2 * r for r in rows]


class FakeClock:
    """The batcher's clock, moved by the test: real time passing changes nothing."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def one_instance(**settings) -> BatchConfig:
    """A batcher with one worker: these tests are about how batches form while a batch runs, and a second instance
    would take the rows queued behind it as a batch of its own at once (the default is one instance per core;
    two instances at once: test_instances.py)."""
    return BatchConfig(instances=1, **settings)


async def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


async def test_lone_request_dispatches_at_once_without_the_queue_delay():
    work = Work()
    b = Batcher(work, one_instance(max_queue_delay_ms=2000), clock=FakeClock()).start()
    # the clock never moves: a batcher that waited for the 2 s delay would wait forever
    assert await asyncio.wait_for(b.infer([1, 2, 3]), HOLD_S) == [2, 4, 6]
    assert work.batches == [[1, 2, 3]]
    await b.close()


async def test_requests_queued_behind_a_running_batch_go_together():
    work = Work()
    b = Batcher(work, one_instance(max_batch_size=16, max_queue_delay_ms=0)).start()
    work.gate.clear()
    first = asyncio.ensure_future(b.infer([0]))
    await wait_until(work.entered.is_set)
    rest = [asyncio.ensure_future(b.infer([i])) for i in range(1, 8)]
    await wait_until(lambda: b.depth == 7)
    work.gate.set()
    assert await first == [0]
    assert [await r for r in rest] == [[2 * i] for i in range(1, 8)]
    assert work.batches == [[0], [1, 2, 3, 4, 5, 6, 7]]
    await b.close()


async def test_max_batch_size_splits_a_long_queue():
    work = Work()
    b = Batcher(work, one_instance(max_batch_size=4, bucketing=False)).start()
    work.gate.clear()
    first = asyncio.ensure_future(b.infer([100]))
    await wait_until(work.entered.is_set)
    rest = [asyncio.ensure_future(b.infer([i])) for i in range(10)]
    await wait_until(lambda: b.depth == 10)
    work.gate.set()
    await asyncio.gather(first, *rest)
    assert work.batches == [[100], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # arrival order without bucketing
    await b.close()


async def test_bucketing_groups_rows_of_similar_length_and_keeps_the_oldest_first():
    work = Work()
    b = Batcher(work, one_instance(max_batch_size=3, bucketing=True)).start()
    work.gate.clear()
    first = asyncio.ensure_future(b.infer([99], lengths=[5]))
    await wait_until(work.entered.is_set)
    lengths = [10, 50, 11, 52, 12, 51]
    rest = [asyncio.ensure_future(b.infer([i], lengths=[n])) for i, n in enumerate(lengths)]
    await wait_until(lambda: b.depth == 6)
    work.gate.set()
    await asyncio.gather(first, *rest)
    # the oldest (length 10) goes with the two nearest lengths (11, 12); then the long ones together
    assert work.batches[1:] == [[0, 2, 4], [1, 3, 5]]
    await b.close()


async def test_waits_up_to_the_queue_delay_for_more_rows_while_another_batch_runs():
    clock = FakeClock()
    work = Work()
    b = Batcher(work, BatchConfig(max_batch_size=8, max_queue_delay_ms=300, instances=2), clock=clock).start()
    work.gate.clear()
    first = asyncio.ensure_future(b.infer([0]))
    await wait_until(work.entered.is_set)
    second = asyncio.ensure_future(b.infer([1]))  # a worker is free, but one batch runs: wait for company
    await asyncio.sleep(0.2)  # real time passes, the clock does not: the row keeps waiting
    assert work.batches == [[0]] and b.depth == 1
    clock.now += 0.299
    third = asyncio.ensure_future(b.infer([2]))
    await asyncio.sleep(0.1)
    assert work.batches == [[0]] and b.depth == 2  # 299 ms: still within the delay
    clock.now += 0.001  # the oldest row has waited 300 ms: the batch goes with what it has
    await wait_until(lambda: len(work.batches) == 2)
    assert work.batches == [[0], [1, 2]]
    work.gate.set()
    await asyncio.gather(first, second, third)
    await b.close()


async def test_retry_after_is_the_queue_over_the_measured_throughput():
    clock = FakeClock()
    work = Work()

    def half_a_second(rows: list[int]) -> list[int]:
        clock.now += 0.5  # every batch takes 0.5 s on the batcher's clock
        return work(rows)

    b = Batcher(half_a_second, one_instance(max_queue_size=50), clock=clock).start()
    assert b.retry_after() == 1  # nothing measured yet
    assert await b.infer(list(range(10))) == [2 * i for i in range(10)]  # 10 rows in 0.5 s: 20 rows/s
    work.gate.clear()
    first = asyncio.ensure_future(b.infer([0]))
    await wait_until(lambda: len(work.batches) == 2)
    queued = asyncio.ensure_future(b.infer(list(range(50))))
    await wait_until(lambda: b.depth == 50)
    with pytest.raises(ServerOverloadedError) as info:
        b.submit([1])
    assert info.value.retry_after_s == 3  # 50 rows at 20 rows/s: 2.5 s, rounded up
    work.gate.set()
    await asyncio.gather(first, queued)
    await b.close()


async def test_full_queue_answers_overloaded_with_retry_after():
    work = Work()
    b = Batcher(work, one_instance(max_queue_size=3)).start()
    work.gate.clear()
    first = asyncio.ensure_future(b.infer([0]))
    await wait_until(work.entered.is_set)
    queued = asyncio.ensure_future(b.infer([1, 2, 3]))
    await wait_until(lambda: b.depth == 3)
    with pytest.raises(ServerOverloadedError) as info:
        b.submit([4])
    assert info.value.retry_after_s >= 1
    work.gate.set()
    await asyncio.gather(first, queued)
    await b.close()


async def test_timeout_answers_and_the_timed_out_rows_never_run():
    work = Work()
    b = Batcher(work, one_instance(timeout_s=0.1)).start()
    work.gate.clear()
    first = asyncio.ensure_future(b.infer([0], timeout=5))
    await wait_until(work.entered.is_set)
    with pytest.raises(RequestTimeoutError, match=r"did not answer within 0\.1 s"):
        await b.infer([7])
    work.gate.set()
    assert await first == [0]
    assert await b.infer([3]) == [6]
    assert [7] not in work.batches  # dropped from the queue when it timed out
    await b.close()


async def test_a_failing_row_fails_only_its_own_request():
    work = Work()
    b = Batcher(work, one_instance()).start()
    work.gate.clear()
    first = asyncio.ensure_future(b.infer([0]))
    await wait_until(work.entered.is_set)
    good = asyncio.ensure_future(b.infer([1, 2]))
    bad = asyncio.ensure_future(b.infer([-1]))
    await wait_until(lambda: b.depth == 3)
    work.gate.set()
    assert await first == [0]
    assert await good == [2, 4]
    with pytest.raises(InvalidInputError, match="negative"):
        await bad
    await b.close()


async def test_drain_finishes_running_and_queued_rows_then_refuses_new_ones():
    work = Work()
    b = Batcher(work, one_instance()).start()
    work.gate.clear()
    first = asyncio.ensure_future(b.infer([1]))
    await wait_until(work.entered.is_set)
    queued = asyncio.ensure_future(b.infer([2]))
    await wait_until(lambda: b.depth == 1)
    drained = asyncio.ensure_future(b.drain(timeout=5))
    await asyncio.sleep(0.01)
    with pytest.raises(ModelNotReadyError):
        b.submit([3])
    work.gate.set()
    assert await drained is True
    assert await first == [2] and await queued == [4]


async def test_close_answers_queued_rows_instead_of_leaving_them_hanging():
    work = Work()
    b = Batcher(work, one_instance()).start()
    work.gate.clear()
    first = asyncio.ensure_future(b.infer([1]))
    await wait_until(work.entered.is_set)
    queued = asyncio.ensure_future(b.infer([2]))
    await wait_until(lambda: b.depth == 1)
    await b.close()
    with pytest.raises(ModelNotReadyError):
        await queued
    work.gate.set()
    assert await first == [2]  # a batch already running still answers


async def test_timed_out_rows_free_their_queue_slots():
    work = Work()
    b = Batcher(work, one_instance(max_queue_size=4, timeout_s=0.05)).start()
    work.gate.clear()
    first = asyncio.ensure_future(b.infer([0], timeout=5))
    await wait_until(work.entered.is_set)
    with pytest.raises(RequestTimeoutError):
        await b.infer([1, 2, 3, 4])
    assert b.depth == 0
    later = asyncio.ensure_future(b.infer([5, 6, 7, 8], timeout=5))  # would be 429 if the dead rows still counted
    await wait_until(lambda: b.depth == 4)
    work.gate.set()
    assert await first == [0] and await later == [10, 12, 14, 16]
    assert [1, 2, 3, 4] not in work.batches
    await b.close()
