"""Limits (issue 12): Host and Content-Type checks, the server-wide concurrency limit, requests larger than the queue,
bounded per-name maps, load sources and management inputs with bounds, tokenizing off the event loop on cut texts."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from modelpress.errors import ModelpressError

from .conftest import GATE_TIMEOUT_S, add_model, client_for, make_server, text_request, wait_for

pytestmark = pytest.mark.anyio
API_KEY = "test-key-0123456789"
KEY = {"x-api-key": API_KEY}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))


async def test_host_header_is_checked_on_a_loopback_bind(tiny_encoder):
    server = make_server(api_key=API_KEY, allowed_hosts=["models.internal"])
    server.check_host = True  # what serving on 127.0.0.1 sets (a real socket: tests/serving/test_security_process.py)
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "models.internal:80"):
            assert (await c.get("/v2/health/ready", headers={"host": host})).status_code == 200, host
        for host in ("attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example"):
            r = await c.post("/v2/models/enc/infer", json=text_request(["a"]), headers={"host": host})
            assert r.status_code == 400 and "does not answer for the host" in r.json()["error"], host


async def test_posts_need_a_json_content_type(tiny_encoder):
    server = make_server(api_key=API_KEY)
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        # what a web page may send cross-site without a preflight: refused before any handler reads it
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            for path in ("/v2/repository/models/enc/unload", "/v1/embeddings", "/invocations", "/v2/models/enc/infer", "/feedback"):
                r = await c.post(path, content=b'{"model": "enc", "input": "a"}', headers={**KEY, "content-type": ctype})
                assert r.status_code == 415, (ctype, path, r.status_code)
        assert "enc" in server.repository.routers
        r = await c.post("/v1/embeddings", content=b'{"model": "enc", "input": "a"}')  # a body with no Content-Type at all
        assert r.status_code == 415
        ok = await c.post("/v1/embeddings", content=b'{"model": "enc", "input": "a"}', headers={"content-type": "application/json"})
        assert ok.status_code == 200
        r = await c.post("/v1/embeddings", content=b"x", headers={"content-type": "application/octet-stream"})
        assert r.status_code == 415  # the binary tensor type is for /infer only
        r = await c.post("/v2/repository/index", headers=KEY)  # no body, no Content-Type: nothing to misread
        assert r.status_code == 200


async def test_the_server_wide_concurrency_limit_answers_503_with_retry_after(tiny_encoder):
    server = make_server(api_key=API_KEY, max_concurrent_requests=2)
    async with client_for(server) as c:
        runner = await add_model(server, str(tiny_encoder), "enc", record=True)
        runner.gate.clear()  # hold the model: the first requests stay in flight
        held = [asyncio.ensure_future(c.post("/v2/models/enc/infer", json=text_request([f"held {i}"]))) for i in range(2)]
        await wait_for(lambda: server.answering == 2, GATE_TIMEOUT_S, "two requests in flight")
        r = await c.post("/v2/models/enc/infer", json=text_request(["one too many"]))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert (await c.get("/v2/health/ready")).status_code == 200  # probes still answer
        assert (await c.get("/metrics")).status_code == 200
        runner.gate.set()
        assert [x.status_code for x in await asyncio.gather(*held)] == [200, 200]
        assert server.answering == 0
        assert (await c.post("/v2/models/enc/infer", json=text_request(["after"]))).status_code == 200


async def test_a_request_larger_than_the_queue_is_413_not_429_forever(tiny_encoder):
    server = make_server(api_key=API_KEY)
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc", max_queue_size=4)
        r = await c.post("/v2/models/enc/infer", json=text_request(["a"] * 5))
        assert r.status_code == 413 and "at most 4" in r.json()["error"] and "retry-after" not in r.headers
        assert (await c.post("/v2/models/enc/infer", json=text_request(["a"] * 4))).status_code == 200


async def test_per_name_maps_are_bounded(tiny_encoder):
    from modelpress.serving.config import ModelConfig
    from modelpress.serving.repository import MAX_FAILED

    server = make_server(api_key=API_KEY, max_models=2)
    async with client_for(server) as c:
        repo = server.repository
        for i in range(MAX_FAILED + 20):  # repository.failed: the oldest failures are forgotten
            repo._remember_failure(f"m{i}", "failed")
        assert len(repo.failed) == MAX_FAILED and "m0" not in repo.failed and f"m{MAX_FAILED + 19}" in repo.failed
        await add_model(server, str(tiny_encoder), "enc")
        with pytest.raises(ModelpressError):
            await repo.load(ModelConfig(source="/no/such/folder", name="broken", warmup=False))
        assert repo._locks == {} and repo._lock_users == {}  # locks: only while a load runs
        await add_model(server, str(tiny_encoder), "enc2")
        assert repo._locks == {}
        # routers: at most max_models names
        r = await c.post("/v2/repository/models/third/load", json={"parameters": {"source": "third@production"}}, headers=KEY)
        assert r.status_code == 403 and "max_models" in r.json()["error"]


async def test_load_sources_and_inputs_are_limited(tiny_encoder):
    server = make_server(api_key=API_KEY)
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        for params, status, message in [
            ({"source": "minilm"}, 403, "refused"),  # a zoo short name would train a model inside the server
            ({"source": str(tiny_encoder.parent / "other")}, 403, "--allow-load-from"),  # a folder outside the allow-list
            ({"source": "../../etc"}, 403, "refused"),
            ({"config": '{"source": "enc@production", "threads": 100000000}'}, 400, "threads"),
            ({"config": '{"source": "enc@production", "runtime_options": {"cache_dir": "/"}}'}, 400, "runtime_options"),
            ({"config": '{"source": "enc@production", "batching": {"max_queue_size": 1e12}}'}, 400, "max_queue_size"),
            ({"nonsense": 1}, 400, "nonsense"),
        ]:
            r = await c.post("/v2/repository/models/enc/load", json={"parameters": params}, headers=KEY)
            assert r.status_code == status and message in r.json()["error"], (params, r.status_code, r.text[:300])


async def test_text_is_tokenized_off_the_event_loop_and_cut_first(tiny_encoder):
    from modelpress.serving.handlers import CHARS_PER_TOKEN_BOUND

    server = make_server(api_key=API_KEY)
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        handler = server.repository.get("enc").handler
        seen: list[tuple[str, list[int]]] = []
        encode = handler.encoder.encode

        def recording(texts, *args, **kwargs):
            seen.append((threading.current_thread().name, [len(t) for t in texts]))
            return encode(texts, *args, **kwargs)

        handler.encoder.encode = recording
        long_text = "word " * 19_000  # 95,000 characters: under max_text_chars, far over what the model reads
        r = await c.post("/v2/models/enc/infer", json=text_request([long_text, "short"]))
        assert r.status_code == 200
        ((thread, lengths),) = seen
        assert thread != threading.main_thread().name and lengths == [handler.max_length * CHARS_PER_TOKEN_BOUND, 5]
        assert encode([long_text])[0][0] == encode([long_text[: lengths[0]]])[0][0]  # the cut changes nothing the model reads


def test_metrics_and_known_configs_are_bounded():
    from modelpress.serving.config import ModelConfig, ServerConfig
    from modelpress.serving.metrics import MAX_RETIRED_VERSIONS, Metrics
    from modelpress.serving.repository import MAX_KNOWN, ModelRepository

    metrics = Metrics()
    for v in range(MAX_RETIRED_VERSIONS + 50):  # ever new version labels, each answered once, then unloaded
        metrics.track_version("m", str(v), inflight=lambda: 0, depth=lambda: 0, load_seconds=0.1)
        metrics.observe_request("m", str(v), "kserve_v2", 200, 0.01)
        metrics.batch_observer("m", str(v))(1, [0.001], 0.01)
        metrics.forget_version("m", str(v))
    assert len(metrics._children) == MAX_RETIRED_VERSIONS
    text = metrics.render()[0].decode()
    assert 'version="0"' not in text and f'version="{MAX_RETIRED_VERSIONS + 49}"' in text  # the newest stay, the oldest go
    repo = ModelRepository(ServerConfig(), metrics)
    for i in range(MAX_KNOWN + 10):
        repo._remember_config(f"m{i}", ModelConfig(source="m@production", name=f"m{i}"))
    assert len(repo.known) == MAX_KNOWN and "m0" not in repo.known and f"m{MAX_KNOWN + 9}" in repo.known


# -- slow bodies, drains past their timeout (review of issue 12) -----------------------------------------------
SHORT_BODY_TIMEOUT_S = 0.5  # the server's body-read timeout in these tests (the default, 30 s, is too long to wait for)
SOCKET_TIMEOUT_S = 10  # the test's own bound on waiting for the server's answer


def _stalled_upload(url: str, path: str = "/v1/embeddings") -> Any:
    """A raw socket that sent the headers and half of a 100-byte body, then stalls (127.0.0.1 only)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    sock.sendall(head.encode() + b'{"model": "m", "input": "' + b"a" * 24)
    return sock


def test_a_client_that_stalls_mid_body_gets_408_and_frees_its_slot():
    import time

    import httpx

    from modelpress.serving.app import ModelServer
    from modelpress.serving.config import ServerConfig

    server = ModelServer(ServerConfig(api_key=API_KEY, access_log=False, body_timeout_s=SHORT_BODY_TIMEOUT_S, max_concurrent_requests=1))
    with server.in_thread() as running:
        sock = _stalled_upload(running.url)
        try:
            started = time.monotonic()
            answer = sock.recv(4096)
            waited = time.monotonic() - started
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"did not arrive within" in answer and SHORT_BODY_TIMEOUT_S <= waited + 0.05 < SOCKET_TIMEOUT_S, waited
        # the only request slot is free again
        assert httpx.get(f"{running.url}/v1/models", timeout=SOCKET_TIMEOUT_S).status_code == 200


def test_a_drain_past_its_timeout_is_flagged_and_ends_the_process_by_the_signal(monkeypatch):
    import signal

    from modelpress.serving.app import ModelServer, _uvicorn_server
    from modelpress.serving.config import ServerConfig

    # a request still running when drain_timeout_s ends (a body that never completes): the drain is flagged as cut short
    server = ModelServer(ServerConfig(api_key=API_KEY, access_log=False, drain_timeout_s=0.3))
    with server.in_thread() as running:
        sock = _stalled_upload(running.url)
        try:
            running.stop()
        finally:
            sock.close()
    assert server.drain_timed_out
    # what the process does then: a complete drain exits 0 (the signal is not re-raised), a cut-short one ends by it
    raised: list[int] = []
    monkeypatch.setattr(signal, "raise_signal", raised.append)
    for timed_out in (False, True):
        other = ModelServer(ServerConfig(api_key=API_KEY, access_log=False))
        uv = _uvicorn_server(other, other.config, lifespan="on")
        with uv.capture_signals():
            uv.handle_exit(signal.SIGTERM, None)
            other.drain_timed_out = timed_out
    assert raised == [signal.SIGTERM]
