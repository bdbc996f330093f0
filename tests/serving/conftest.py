"""Fixtures for the server tests: tiny models behind a real ModelServer, in-process or on a socket.

``RecordingRunner`` wraps a real runner and records the batch size of every call; its ``gate``
(a threading.Event) holds calls until the test releases them, so a test can queue requests
behind a running batch and then assert exactly which batches the runner saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

pytest.importorskip("fastapi")

GATE_TIMEOUT_S = 10  # a gated runner never blocks a test for longer than this
POLL_S = 0.005  # how often the waits below look again


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` on the event loop until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(POLL_S)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """:func:`wait_for` for a thread (blocking)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_S)


class RecordingRunner:
    """A real runner that records batch sizes; ``gate`` holds calls, ``delay_s`` slows each one."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.delay_s = 0.0
        self.entered = threading.Event()  # set when a call has started (and may be held by the gate)

    def load(self) -> RecordingRunner:
        self.inner.load()
        return self

    def run(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.sizes.append(int(next(iter(batch.values())).shape[0]))
        self.entered.set()
        if not self.gate.wait(GATE_TIMEOUT_S):
            raise TimeoutError("the test never opened the runner's gate")
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.inner.run(batch)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def make_server(**settings: Any) -> Any:
    """A model server with rollouts (what ``modelpress serve`` runs), not started."""
    from modelpress.rollout import RolloutServer
    from modelpress.serving.config import ServerConfig

    return RolloutServer(ServerConfig(access_log=False, **settings))


async def add_model(
    server: Any, source: Any, name: str, *, version: str | None = None, record: bool = False, task: str | None = None, **batching: Any
) -> Any:
    """Load ``source`` (a folder or an in-memory module) into ``server``; returns the RecordingRunner when ``record``."""
    import modelpress as mp
    from modelpress.serving.config import BatchConfig, ModelConfig

    art = mp.load(source, task=task) if not isinstance(source, str) else mp.load(source)
    cfg = ModelConfig(
        source=str(source) if isinstance(source, str) else "in-memory", name=name, version=version, batching=BatchConfig(**batching)
    )
    runner = RecordingRunner(mp.create_runner(art, "torch", threads=1)) if record else None
    await server.repository.load(cfg, runner=runner, artifact=art)
    if runner is not None:
        runner.sizes.clear()  # forget the warm-up calls
        runner.entered.clear()
    return runner


@contextlib.asynccontextmanager
async def client_for(server: Any) -> AsyncIterator[Any]:
    import httpx

    transport = httpx.ASGITransport(server.app)
    async with server.running(), httpx.AsyncClient(transport=transport, base_url="http://modelpress.test", timeout=30) as client:
        yield client


def text_request(texts: list[str], name: str = "text") -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


@pytest.fixture
def registry_url(tmp_path, tiny_encoder) -> str:
    """A registry with tiny-enc:1 in production and tiny-enc:2 (the same weights) as a candidate."""
    import modelpress as mp
    from modelpress.registry.api import Registry

    url = str(tmp_path / "reg.db")
    with Registry(url) as reg:
        reg.register(mp.load(str(tiny_encoder)), "tiny-enc", stage="production")
        reg.register(mp.load(str(tiny_encoder)), "tiny-enc")
    return url


def registry_at(url: str) -> Any:
    """The registry at ``url`` (use it in a with block)."""
    from modelpress.registry.api import Registry

    return Registry(url)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- causal LMs (tests/serving/test_llm_*.py) ---------------------------------------------------
LLM_MAX_BATCH = 4  # sequences the served engine decodes together
LLM_MAX_WAITING = 4  # sequences it queues before answering 429


@pytest.fixture(scope="session")
def llm_server(stories260k) -> Any:
    """stories260k served on 127.0.0.1 for the whole session (with rollouts and the dashboard, as `modelpress serve`
    runs it): yields (server, base URL). Tests leave it idle: every sequence they start ends or is cancelled."""
    from modelpress.serving.config import BatchConfig, ModelConfig

    batching = BatchConfig(max_batch_size=LLM_MAX_BATCH, max_queue_size=LLM_MAX_WAITING)
    server = make_server(models=[ModelConfig(source=str(stories260k), name="stories260k", batching=batching)])
    with server.in_thread() as running:
        yield server, running.url
