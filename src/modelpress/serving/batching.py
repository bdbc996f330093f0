"""The dynamic batcher: one per loaded model version, feeding its runner in worker threads.

Requests are split into rows (one text, one image) and queued. A dispatcher task on the event
loop forms batches and hands each to a thread pool with ``instances`` workers, so the loop never
blocks on the model:

* a batch goes at once when a worker is free and no other batch of this version is running, so
  a lone request never waits (no idle delay at concurrency 1);
* while other batches run, the batch waits up to ``max_queue_delay_ms`` from its oldest row for
  more rows, up to ``max_batch_size``;
* with ``bucketing`` (text), a full queue is not cut in arrival order: the oldest row goes with
  the rows whose token length is nearest its own, so a batch is padded only to its longest
  member and no row waits behind ever-newer ones (the oldest always goes next);
* the queue is bounded (``max_queue_size`` rows): past it, :class:`ServerOverloadedError` (429)
  with a Retry-After estimated from the recent throughput; each request has a timeout
  (:class:`RequestTimeoutError`, 504), after which its rows are dropped from the queue;
* a batch that raises is run again row by row, so one bad input fails only its own request.

Queue times, the delay deadline and the throughput behind Retry-After are read from ``clock``
(default :func:`time.monotonic`): a test can hold the clock still, or move it past a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

from modelpress.errors import InvalidInputError, ModelNotReadyError, PayloadTooLargeError, RequestTimeoutError, ServerOverloadedError
from modelpress.serving.config import BatchConfig

log = logging.getLogger("modelpress.serving")

BatchObserver = Callable[[int, list[float], float], None]  # (rows, queue seconds per row, run seconds)
_RATE_SMOOTHING = 0.2  # weight of the newest batch in the rows-per-second estimate behind Retry-After
_MAX_RETRY_AFTER_S = 60
WAIT_SLICE_S = 0.05  # a batch waiting for company looks at the clock at least this often (delays are usually shorter)
# The stage times (seconds) of the request being answered, when the server reports them (``server_timing``): the
# serving middleware sets a dict per request; the server adds "decode", the batcher "queue" (its first row queued to its
# last batch starting) and "batch" (that batch's run: collate, model, split, and the hops to its worker thread and back).
request_timing: ContextVar[dict[str, float] | None] = ContextVar("modelpress_request_timing", default=None)


class _Pending:
    """One request's rows in flight: its future, the results so far, how many rows are left."""

    __slots__ = ("enqueued", "future", "queued", "remaining", "results", "run_end", "run_start")

    def __init__(self, future: asyncio.Future, n: int, enqueued: float) -> None:
        self.future = future
        self.results: list[Any] = [None] * n
        self.remaining = n
        self.queued = n  # rows still in the queue (not yet in a batch)
        self.enqueued = enqueued
        self.run_start = self.run_end = enqueued  # of the batch that ran its last rows (what request_timing reports)


class Batcher:
    """Batches rows for ``work(rows) -> results`` (one result per row), run in worker threads."""

    def __init__(
        self,
        work: Callable[[list[Any]], list[Any]],
        config: BatchConfig | None = None,
        *,
        name: str = "model",
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.work = work
        self.clock = clock
        self.config = config or BatchConfig()
        self.name = name
        self.observer = observer
        # queue entries: (pending, index in request, row, length, enqueued at)
        self._queue: deque[tuple[_Pending, int, Any, int, float]] = deque()
        self._pool = ThreadPoolExecutor(self.config.instances, thread_name_prefix=f"mp-{name}")
        self._running = 0
        self._dead = 0  # queued rows of requests that timed out (skipped, and not counted as queued)
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: asyncio.Task | None = None
        self._arrived: asyncio.Event | None = None
        self._freed: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._rate = 0.0  # rows per second, smoothed
        self.accepting = False
        self.batches = 0
        self.rows_done = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Batcher:
        """Start the dispatcher on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._arrived, self._freed, self._idle = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._dispatcher = self._loop.create_task(self._dispatch(), name=f"batcher-{self.name}")
        self.accepting = True
        return self

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking requests, let queued and running ones finish (within ``timeout``), then close.

        Returns True when everything finished in time; rows still queued after the deadline are
        answered with :class:`ModelNotReadyError`.
        """
        self.accepting = False
        done = True
        if self._idle is not None and not self._is_idle():
            try:
                async with asyncio.timeout(timeout):
                    while not self._is_idle():
                        self._idle.clear()
                        await self._idle.wait()
            except TimeoutError:
                done = False
        await self.close()
        return done

    async def close(self) -> None:
        """Stop at once: queued rows are answered with :class:`ModelNotReadyError`."""
        self.accepting = False
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        error = ModelNotReadyError(f"Model '{self.name}' was unloaded before this request ran.", hint="Send it again.")
        while self._queue:
            pending = self._queue.popleft()[0]
            if not pending.future.done():
                pending.future.set_exception(error)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _is_idle(self) -> bool:
        return self._running == 0 and self.depth == 0

    # -- submitting ------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Rows waiting (not yet in a running batch)."""
        return len(self._queue) - self._dead

    @property
    def running(self) -> int:
        """Batches running now."""
        return self._running

    def submit(self, rows: list[Any], lengths: list[int] | None = None) -> asyncio.Future:
        """Queue one request's rows; the future gets the list of their results, in order."""
        return self._enqueue(rows, lengths).future

    def _enqueue(self, rows: list[Any], lengths: list[int] | None) -> _Pending:
        if not self.accepting:
            raise ModelNotReadyError(f"Model '{self.name}' is not taking requests (it is loading or unloading).", hint="Retry in a moment.")
        n = len(rows)
        if n == 0:
            raise InvalidInputError("The request has no inputs.", hint='Send at least one, e.g. ["A man is playing a guitar."]')
        if n > self.config.max_queue_size:  # would wait for room forever: not an overload, a request too large for this queue
            raise PayloadTooLargeError(
                f"The request has {n} rows; model '{self.name}' queues at most {self.config.max_queue_size}.",
                hint=f"Send at most {self.config.max_queue_size} inputs per request, or raise max_queue_size in the model's serve config.",
            )
        if self.depth + n > self.config.max_queue_size:
            raise ServerOverloadedError(
                f"Model '{self.name}' has {self.depth} rows queued (at most {self.config.max_queue_size}).",
                retry_after_s=self.retry_after(),
                hint="Retry after the time in the Retry-After header, or raise max_queue_size / instances in the model's serve config.",
            )
        now = self.clock()
        pending = _Pending(self._loop.create_future(), n, now)
        q = self._queue
        if lengths is None:
            for i, row in enumerate(rows):
                q.append((pending, i, row, 0, now))
        else:
            for i, row in enumerate(rows):
                q.append((pending, i, row, lengths[i], now))
        if not self._arrived.is_set():
            self._arrived.set()
        return pending

    async def infer(self, rows: list[Any], lengths: list[int] | None = None, timeout: float | None = None) -> list[Any]:
        """Submit rows and wait for their results, at most ``timeout`` seconds (default: the config's)."""
        pending = self._enqueue(rows, lengths)
        limit = self.config.timeout_s if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                results = await pending.future
        except TimeoutError:
            self._dead += pending.queued  # its queued rows no longer count
            raise RequestTimeoutError(
                f"Model '{self.name}' did not answer within {limit:g} s ({self.depth} rows queued, {self._running} batches running).",
                hint="Retry later, send fewer inputs per request, or raise timeout_s in the model's serve config.",
            ) from None
        timing = request_timing.get()
        if timing is not None and "batch" not in timing:  # the request's own batch (not a shadow copy's, run after it)
            timing["queue"] = pending.run_start - pending.enqueued
            timing["batch"] = pending.run_end - pending.run_start
        return results

    def retry_after(self) -> int:
        """Seconds after which the queue is likely to have room again."""
        if self._rate <= 0:
            return 1
        return min(_MAX_RETRY_AFTER_S, max(1, math.ceil(self.depth / self._rate)))

    # -- dispatching -----------------------------------------------------------------------
    async def _dispatch(self) -> None:
        cfg = self.config
        delay = cfg.max_queue_delay_ms / 1000.0
        max_bs = cfg.max_batch_size
        q = self._queue
        while True:
            while not q:
                self._arrived.clear()
                await self._arrived.wait()
            while self._running >= cfg.instances:
                self._freed.clear()
                await self._freed.wait()
            if self._running and delay > 0 and len(q) < max_bs:
                deadline = q[0][4] + delay
                while len(q) < max_bs:
                    remaining = deadline - self.clock()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    with contextlib.suppress(TimeoutError):  # then the clock says whether the deadline has passed
                        async with asyncio.timeout(min(remaining, WAIT_SLICE_S)):
                            await self._arrived.wait()
            rows = self._take(max_bs)
            if not rows:
                if not q:
                    self._idle.set()
                continue
            self._running += 1
            task = self._loop.create_task(self._run(rows))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self, max_bs: int) -> list[tuple[_Pending, int, Any, int, float]]:
        """The next batch: rows of requests still waiting, bucketed by length when the queue is long."""
        q = self._queue
        live = [r for r in q if not r[0].future.done()]  # skip rows of requests that timed out
        q.clear()
        self._dead = 0
        if len(live) <= max_bs:
            batch = live
        elif not self.config.bucketing:
            q.extend(live[max_bs:])
            batch = live[:max_bs]
        else:
            anchor, rest = live[0], live[1:]
            target = anchor[3]
            nearest = sorted(range(len(rest)), key=lambda i: (abs(rest[i][3] - target), i))[: max_bs - 1]
            chosen = set(nearest)
            q.extend(r for i, r in enumerate(rest) if i not in chosen)
            batch = [anchor, *(rest[i] for i in sorted(nearest))]
        for r in batch:
            r[0].queued -= 1
        return batch

    async def _run(self, rows: list[tuple[_Pending, int, Any, int, float]]) -> None:
        started = self.clock()
        try:
            results = await self._loop.run_in_executor(self._pool, self._work_isolated, [r[2] for r in rows])
        except BaseException as exc:  # the pool was shut down, or the task was cancelled at close
            results = [ModelNotReadyError(f"Model '{self.name}' stopped before this request ran: {exc!r}")] * len(rows)
            if isinstance(exc, asyncio.CancelledError):
                self._finish(rows, results, started)
                raise
        self._finish(rows, results, started)

    def _finish(self, rows: list[tuple[_Pending, int, Any, int, float]], results: list[Any], started: float) -> None:
        seconds = self.clock() - started
        self._running -= 1
        self._freed.set()
        for (pending, i, _row, _len, _t), result in zip(rows, results, strict=True):
            fut = pending.future
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
                continue
            pending.results[i] = result
            pending.remaining -= 1
            if pending.remaining == 0:
                pending.run_start, pending.run_end = started, started + seconds
                fut.set_result(pending.results)
        n = len(rows)
        self.batches += 1
        self.rows_done += n
        if seconds > 0:
            self._rate = n / seconds if self._rate == 0 else (1 - _RATE_SMOOTHING) * self._rate + _RATE_SMOOTHING * n / seconds
        if self.observer is not None:
            self.observer(n, [started - r[4] for r in rows], seconds)
        if self._is_idle():
            self._idle.set()

    def _work_isolated(self, rows: list[Any]) -> list[Any]:
        """Run one batch; when it raises, run its rows one by one so only the bad row fails."""
        try:
            results = self.work(rows)
        except Exception as exc:  # noqa: BLE001  (whatever the model raised answers the request that caused it)
            if len(rows) == 1:
                return [exc]
            log.warning("batch of %d rows for %s failed (%r); running its rows one by one", len(rows), self.name, exc)
            results = []
            for row in rows:
                try:
                    results.extend(self.work([row]))
                except Exception as one:  # noqa: BLE001  (one bad row fails only its own request)
                    results.append(one)
            return results
        if len(results) != len(rows):
            error = RuntimeError(f"The handler of '{self.name}' returned {len(results)} results for {len(rows)} rows.")
            return [error] * len(rows)
        return results
