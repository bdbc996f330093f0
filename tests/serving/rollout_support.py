"""Helpers for the routing, rollout and dashboard tests: faulty candidates and steady client traffic."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .conftest import text_request, wait_for

__all__ = ["FAIL_TEXT", "FaultyRunner", "Traffic", "fail_token_of", "load_version", "steady_traffic", "wait_for"]

FAIL_TEXT = "zebra zebra zebra"  # requests holding this text fail on a FaultyRunner set to fail on it


class FaultyRunner:
    """A real runner that can be made to fail or slow down after it loaded (warm-up runs clean).

    ``always``: every call raises. ``fail_token``: calls whose batch holds this token id raise
    (the batcher then reruns rows one by one, so exactly the requests holding it fail).
    ``delay_s``: each call sleeps first.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.always = False
        self.fail_token: int | None = None
        self.delay_s = 0.0
        self.negate = False  # answer with negated outputs (embeddings then point the other way: cosine -1)
        self.calls = 0
        self._lock = threading.Lock()

    def load(self) -> FaultyRunner:
        self.inner.load()
        return self

    def run(self, batch: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.always:
            raise RuntimeError("injected failure: this candidate fails every request")
        if self.fail_token is not None and np.any(batch["input_ids"] == self.fail_token):
            raise RuntimeError("injected failure on a marked request")
        out = self.inner.run(batch)
        return {k: -v for k, v in out.items()} if self.negate else out

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def load_version(server: Any, source: str, name: str, version: str, *, faulty: bool = False) -> FaultyRunner | None:
    """Load folder ``source`` as ``name:version`` without making it the default; returns its FaultyRunner when asked."""
    import modelpress as mp
    from modelpress.serving.config import ModelConfig

    art = mp.load(source)
    runner = FaultyRunner(mp.create_runner(art, "torch", threads=1)) if faulty else None
    cfg = ModelConfig(source=source, name=name, version=version, threads=1)
    await server.repository.load(cfg, runner=runner, artifact=art, make_default=False, retire_previous=False)
    return runner


def fail_token_of(server: Any, name: str, version: str) -> int:
    handler = server.repository.routers[name].versions[version].handler
    return int(handler.decode([FAIL_TEXT]).rows[0][0][1])  # the first token after [CLS]


@dataclass
class Traffic:
    """What steady client traffic saw: per request its status, the version that answered, its latency."""

    statuses: list[int] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failed_texts: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for s in self.statuses if s != 200)


@contextlib.asynccontextmanager
async def steady_traffic(
    client: Any,
    model: str,
    *,
    clients: int = 4,
    fail_share: float = 0.0,
    pause_s: float = 0.0,
    headers: Callable[[int], dict[str, str]] | None = None,
) -> AsyncIterator[Traffic]:
    """``clients`` concurrent clients sending one-text requests until the block ends.

    ``fail_share``: that share of requests (every n-th, deterministically) carries FAIL_TEXT.
    """
    seen = Traffic()
    stop = asyncio.Event()
    every = round(1 / fail_share) if fail_share else 0

    async def one_client(c: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            text = FAIL_TEXT if every and i % every == 0 else f"client {c} request {i}"
            t0 = time.perf_counter()
            r = await client.post(
                f"/v2/models/{model}/infer", json=text_request([text]), headers=headers(i * clients + c) if headers else None
            )
            seen.seconds.append(time.perf_counter() - t0)
            seen.statuses.append(r.status_code)
            body = r.json()
            seen.versions.append(body.get("model_version", "?") if r.status_code == 200 else "?")
            if r.status_code != 200:
                seen.errors.append(str(body.get("error"))[:200])
                seen.failed_texts.append(text)
            if pause_s:
                await asyncio.sleep(pause_s)
            else:
                await asyncio.sleep(0)

    tasks = [asyncio.ensure_future(one_client(c)) for c in range(clients)]
    try:
        yield seen
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
