"""Rollouts of causal LMs: shadow copies of OpenAI completions scored by first-token agreement, then the canary.

stories260k (the torch engine, the reference) serves version 1. Both candidates are copies made
here by :func:`rounded_copy`: every linear layer rounded to nearest per output channel, stored
dequantized in float32 and served by the torch engine: the good one in 8 bits, the broken one
in 2 bits (three levels: -s, 0, +s). Greedy completions and chats from the TinyStories sample
drive them through a shadow window and canary steps on a real server (in-process ASGI). The
OpenVINO variants of LLM quantization are rolled out by ``ship`` (tests/serving/test_ship_llm.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from modelpress.rollout.spec import ACTIVE

from .conftest import client_for, make_server, wait_for

ROLLOUT_TIMEOUT_S = 90  # loading the candidate (the openvino engine exports and compresses once) plus three short windows
TRAFFIC_TIMEOUT_S = 30
KEY = "llm-rollout-key-1234"
AUTH = {"x-api-key": KEY}
MAX_TOKENS = 8  # short completions: the windows fill in well under a second on 2 shared cores
# Bounds for a loaded 2-core machine: the shadow copies start after the primary answered and share its cores, so their
# first-token times are loose; agreement is the check under test. Measured here (60 greedy prompts of the TinyStories
# sample): the openvino engine's int8 agrees with the reference on the first token of 0.93 of prompts, its int4 on
# 0.71, a 3-bit copy on 0.22, the 2-bit copy on 0.0.
MIN_AGREEMENT = 0.5
SPEC = {"window_s": 0.5, "min_requests": 8, "max_error_rate": 0.0, "max_p99_ratio": 20.0, "min_agreement": MIN_AGREEMENT}


def rounded_copy(source: Path, target: Path, bits: int) -> Path:
    """``source`` (a Hugging Face folder) with every 2-D weight but the embeddings rounded to ``bits`` per output channel.

    Symmetric round-to-nearest, levels -q..q with q = 2^(bits-1) - 1 (2 bits: {-1, 0, +1} x max|w| of the row).
    """
    import torch
    from safetensors.torch import load_file, save_file

    q = 2 ** (bits - 1) - 1
    shutil.copytree(source, target)
    weights = load_file(str(target / "model.safetensors"))
    for name, w in weights.items():
        if w.ndim == 2 and "embed" not in name:
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / q
            weights[name] = (torch.round(w / scale).clamp(-q, q) * scale).contiguous()
    save_file(weights, str(target / "model.safetensors"))
    return target


def prompts(data_dir: Path, n: int = 40) -> list[str]:
    """The first five words of the TinyStories sample's sentences (of six words or more)."""
    text = (data_dir / "tinystories/sample.txt").read_text()
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6]
    return [" ".join(s.split()[:5]) for s in sentences][:n]


class Seen:
    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.errors: list[str] = []


@contextlib.asynccontextmanager
async def greedy_traffic(client: Any, texts: list[str], clients: int = 2, chat_every: int = 5) -> AsyncIterator[Seen]:
    """Clients sending greedy completions (every ``chat_every``-th a chat, streamed) until the block ends."""
    seen = Seen()
    stop = asyncio.Event()

    async def one(c: int) -> None:
        i = c
        while not stop.is_set():
            i += clients
            text = texts[i % len(texts)]
            if i % chat_every == 0:
                body = {"model": "story", "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS, "temperature": 0}
                r = await client.post("/v1/chat/completions", json={**body, "stream": True})
            else:
                r = await client.post(
                    "/v1/completions", json={"model": "story", "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0}
                )
            seen.statuses.append(r.status_code)
            if r.status_code != 200 or '"error"' in r.text:
                seen.errors.append(r.text[:200])
            await asyncio.sleep(0)

    tasks = [asyncio.ensure_future(one(c)) for c in range(clients)]
    try:
        yield seen
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


async def _roll_out(data_dir: Path, stories260k: Path, candidate: dict[str, Any]) -> tuple[dict[str, Any], Seen, Any]:
    from modelpress.serving.config import ModelConfig

    server = make_server(api_key=KEY, models=[ModelConfig(source=str(stories260k), name="story", version="1", threads=1)])
    async with client_for(server) as c, greedy_traffic(c, prompts(data_dir)) as seen:
        await wait_for(lambda: len(seen.statuses) > 10, TRAFFIC_TIMEOUT_S, "traffic")
        spec = {"candidate": "2", "strategy": "shadow-then-canary", "steps": [50, 100], **SPEC, **candidate}
        r = await c.post("/rollouts/story/start", json=spec, headers=AUTH)
        assert r.status_code == 201, r.text
        await wait_for(lambda: server.rollouts.get("story").status not in ACTIVE, ROLLOUT_TIMEOUT_S, "the rollout to end")
        n = len(seen.statuses)
        await wait_for(lambda: len(seen.statuses) > n + 5, TRAFFIC_TIMEOUT_S, "traffic after the rollout")
        status = (await c.get("/rollouts/story", headers=AUTH)).json()
        report = (await c.get("/rollouts/story/report", headers=AUTH)).json()
    live = {v: server.observations.window("story", v).n for v in ("1", "2")}
    return status, seen, {**report, "live": live}


@pytest.mark.anyio
async def test_an_int8_candidate_agrees_in_shadow_and_is_promoted(data_dir, stories260k, tmp_path):
    t0 = time.monotonic()
    good = rounded_copy(stories260k, tmp_path / "stories260k-int8", 8)
    status, seen, report = await _roll_out(data_dir, stories260k, {"source": str(good)})
    assert status["status"] == "succeeded", (status.get("reason"), status["events"])
    assert seen.errors == [] and set(seen.statuses) == {200}, seen.errors[:3]
    shadow = next(e for e in status["events"] if e["action"] == "advance")["numbers"]["candidate"]
    assert shadow["agreement"] >= MIN_AGREEMENT and shadow["agreement_n"] >= SPEC["min_requests"], shadow
    # the latency each version reports for an LLM is its time to first token: a few ms here, never the whole completion
    assert report["versions"]["2"]["shadow"]["p50_ms"] < 1000, report
    assert report["live"]["2"] > 0  # the canary and the promotion sent clients to the candidate
    print(f"int8 candidate: shadow agreement {shadow['agreement']:.3f} over {shadow['agreement_n']} copies; {time.monotonic() - t0:.1f} s")


@pytest.mark.anyio
async def test_a_two_bit_candidate_is_rolled_back_by_the_shadow_agreement_check(data_dir, stories260k, tmp_path):
    broken = rounded_copy(stories260k, tmp_path / "stories260k-2bit", 2)
    status, seen, _ = await _roll_out(data_dir, stories260k, {"source": str(broken)})
    assert status["status"] == "rolled_back", (status.get("reason"), status["events"])
    rollback = next(e for e in status["events"] if e["action"] == "rollback")
    assert any(r.startswith("agreement ") for r in rollback["reasons"]), rollback["reasons"]
    shadow = rollback["numbers"]["candidate"]
    assert shadow["agreement"] < 0.2 and shadow["agreement_n"] >= SPEC["min_requests"], shadow
    assert seen.errors == [] and set(seen.statuses) == {200}  # the candidate answered no client: shadow only
    print(f"2-bit candidate: shadow agreement {shadow['agreement']:.3f} over {shadow['agreement_n']} copies")


@pytest.mark.anyio
async def test_sampled_requests_are_mirrored_but_not_scored(stories260k):
    """A copy of a sampled request is generated (latency, errors) but carries no agreement: its tokens are chance."""
    from modelpress.rollout.routing import ShadowPolicy
    from modelpress.serving.config import ModelConfig

    server = make_server(models=[ModelConfig(source=str(stories260k), name="story", version="1", threads=1)])
    async with client_for(server) as c:
        cfg = ModelConfig(source=str(stories260k), name="story", version="2", threads=1)
        await server.repository.load(cfg, make_default=False, retire_previous=False)
        server.repository.routers["story"].set_policy(ShadowPolicy("1", "2", 1.0))
        body = {"model": "story", "prompt": ["Once upon a time", "The cat"], "max_tokens": 4}
        assert (await c.post("/v1/completions", json={**body, "temperature": 1.0, "seed": 3})).status_code == 200
        assert (await c.post("/v1/completions", json={**body, "temperature": 0, "n": 2})).status_code == 200
        await wait_for(lambda: len(server.observations.shadows.get(("story", "2"), ())) == 2, 10, "two shadow copies")
        await server.mirror.wait(5)
    records = list(server.observations.shadows[("story", "2")])
    assert [r[3] for r in records] == [None, 1.0]  # sampled: not scored; greedy, the same model: every first token agrees
    assert all(r[2] == 1 and 0 < r[1] < 5 for r in records)  # answered, in a first-token time
