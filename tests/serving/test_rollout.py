"""The rollout controller: canaries that promote or roll back on live numbers, restarts, instant rollback."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from modelpress.errors import ConfigError
from modelpress.rollout.analysis import WindowStats, evaluate
from modelpress.rollout.spec import ACTIVE, RolloutSpec, parse_spec, phases_of
from modelpress.serving.config import ModelConfig
from modelpress.serving.routing import SinglePolicy

from .conftest import client_for, make_server, text_request
from .rollout_support import FAIL_TEXT, fail_token_of, load_version, steady_traffic, wait_for

KEY = "test-key-123456"
AUTH = {"x-api-key": KEY}
ROLLOUT_TIMEOUT_S = 60  # a rollout of 0.2-0.6 s windows ends in seconds; this only bounds a hung one
# How many windows a decision takes is tested on a fake clock (test_rollout_windows.py); the tests
# here hold a real server under real traffic to what clients see.


def _stats(n: int, errors: int = 0, latency_s: float = 0.01, agreement: float = float("nan")) -> WindowStats:
    lat = np.full(n - errors, latency_s)
    w = WindowStats(n=n, errors=errors, latencies=lat, agreement=agreement, n_agreement=n if agreement == agreement else 0)
    if lat.size:
        w.p50 = w.p99 = latency_s
    return w


def test_evaluate_passes_breaches_and_waits_on_thresholds():
    spec = RolloutSpec(candidate="2", max_error_rate=0.01, max_p99_ratio=1.2, min_agreement=0.99, min_requests=20)
    base = _stats(200, latency_s=0.010)
    assert evaluate(spec, _stats(100, latency_s=0.011), base).action == "pass"
    v = evaluate(spec, _stats(100, errors=5, latency_s=0.011), base)
    assert v.action == "breach" and "error rate 5.00% > 1.00%" in v.reasons[0] and v.numbers["candidate"]["errors"] == 5
    v = evaluate(spec, _stats(100, latency_s=0.030), base)
    assert v.action == "breach" and "3.00x the baseline" in v.reasons[0] and v.numbers["p99_ratio"] == pytest.approx(3.0)
    assert evaluate(spec, _stats(10, errors=5), base).action == "wait"  # too few requests to judge
    # at 100 % the baseline has no traffic: the p99 it had in earlier windows is the reference
    v = evaluate(spec, _stats(100, latency_s=0.030), WindowStats(), reference_p99=0.010)
    assert v.action == "breach" and v.numbers["baseline_p99_ms"] == pytest.approx(10.0)
    # shadow windows also hold agreement; mid-window only a clear error-rate breach counts
    assert evaluate(spec, _stats(100, agreement=0.95), base, shadow=True).reasons == ["agreement 0.9500 < 0.99"]
    assert evaluate(spec, _stats(100, agreement=0.999), base, shadow=True).action == "pass"
    assert evaluate(spec, _stats(30, errors=1), base, early=True).action == "wait"  # 3.3 %, but its 95 % lower bound is below 1 %
    assert evaluate(spec, _stats(30, errors=6), base, early=True).action == "breach"


def test_specs_and_phases():
    assert RolloutSpec(candidate="2").steps == [5, 25, 50, 100]
    assert RolloutSpec(candidate="2", steps=[10, 50]).steps == [10, 50, 100]  # a canary always ends at 100 %
    assert RolloutSpec(candidate="2", strategy="ab").steps == [50]
    assert [p["phase"] for p in phases_of(RolloutSpec(candidate="2", strategy="shadow-then-canary", shadow_windows=2, steps=[50]))] == [
        "shadow",
        "shadow",
        "canary",
        "canary",
    ]
    assert [(p["phase"], p["weight"]) for p in phases_of(RolloutSpec(candidate="2", strategy="blue-green"))] == [
        ("shadow", 0.0),
        ("switch", 100.0),
    ]
    for bad, message in [
        ({"candidate": "2", "steps": [50, 25]}, "steps must increase"),
        ({"candidate": "2", "steps": [0, 50]}, r"in \(0, 100\]"),
        ({"candidate": "2", "strategy": "ab", "steps": [10, 20]}, "ab rollout holds one split"),
        ({"candidate": "2", "strategy": "linear"}, "strategy"),
        ({"candidate": "2", "windw_s": 3}, "windw_s"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_spec(bad)


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


def _registry(url: str):
    from modelpress.registry.api import Registry

    return Registry(url)


@pytest.mark.anyio
async def test_canary_of_a_good_candidate_promotes_under_load_with_zero_failed_requests(registry_url):
    server = make_server(registry=registry_url, api_key=KEY, models=[ModelConfig(source="tiny-enc@production", threads=1)])
    async with client_for(server) as c:
        async with steady_traffic(c, "tiny-enc", clients=4) as seen:
            await wait_for(lambda: len(seen.statuses) > 20, 30, "traffic")
            spec = {
                "candidate": "2",
                "steps": [5, 25, 50, 100],
                "window_s": 0.25,
                "min_requests": 5,
                "max_p99_ratio": 3.0,
                "max_error_rate": 0.01,
            }
            r = await c.post("/rollouts/tiny-enc/start", json=spec, headers=AUTH)
            assert r.status_code == 201, r.text
            # version 2 was not loaded: the call returns at once, and traffic stays on 1 while it loads
            assert r.json()["status"] == "loading" and r.json()["phase"] == "loading" and r.json()["persisted"] is True
            assert r.json()["weights"] == {"1": 100.0}
            await wait_for(lambda: server.rollouts.get("tiny-enc").status not in ACTIVE, ROLLOUT_TIMEOUT_S, "the canary to finish")
            n_at_end = len(seen.statuses)
            await wait_for(lambda: len(seen.statuses) > n_at_end + 20, 30, "traffic after the promotion")
        status = (await c.get("/rollouts/tiny-enc", headers=AUTH)).json()
    assert status["status"] == "succeeded", status.get("reason") or status["events"]
    assert seen.failed == 0 and len(seen.statuses) > 100, seen.errors[:3]
    assert set(seen.versions) == {"1", "2"} and seen.versions[-1] == "2"
    with _registry(registry_url) as reg:
        assert reg.get("tiny-enc@production").version == 2
        history = [e["decision"] for e in reg.rollouts.events("tiny-enc")]
        dep = reg.rollouts.get("tiny-enc")
        last = reg.get("tiny-enc:2").stage_history[-1]
        assert (last["to"], last["action"], last["who"]) == ("production", "promote", "modelpress-rollout")
    actions = [h["action"] for h in history]
    assert actions[:2] == ["start", "loaded"] and actions[-1] == "promote" and actions.count("advance") == 3
    loaded = history[1]
    assert loaded["weights"] == {"2": 5.0, "1": 95.0} and loaded["runtime"] == "torch" and "loaded on torch" in loaded["reasons"][0]
    weights = [h["weights"] for h in history if h["action"] == "advance"]
    assert [w.get("2") for w in weights] == [25.0, 50.0, 100.0]  # each advance records the split it moved to
    assert all(h["numbers"]["candidate"]["requests"] >= 5 for h in history if h["action"] in ("advance", "promote") and "numbers" in h)
    assert (
        dep["version"] == 2
        and dep["rollout_state"]["status"] == "succeeded"
        and dep["traffic_policy"] == {"policy": "single", "version": "2"}
    )


@pytest.mark.anyio
async def test_a_candidate_failing_20_percent_is_rolled_back_and_only_its_marked_requests_fail(tiny_encoder):
    server = make_server()
    async with client_for(server) as c:
        await load_version(server, str(tiny_encoder), "enc", "1")
        server.repository.routers["enc"].set_policy(SinglePolicy("1"))
        faulty = await load_version(server, str(tiny_encoder), "enc", "2", faulty=True)
        faulty.fail_token = fail_token_of(server, "enc", "2")
        window, share = 0.6, 20.0
        async with steady_traffic(c, "enc", clients=4, fail_share=0.2) as seen:
            await wait_for(lambda: len(seen.statuses) > 20, 30, "traffic")
            before = len(seen.statuses)
            await server.rollouts.start("enc", {"candidate": "2", "steps": [share, 50], "window_s": window, "min_requests": 10})
            await wait_for(lambda: server.rollouts.get("enc").status not in ACTIVE, ROLLOUT_TIMEOUT_S, "the rollback")
            after = len(seen.statuses)
        ro = server.rollouts.get("enc")
        assert ro.status == "rolled_back" and ro.state["step"] == 0
        last = ro.events[-1]
        assert last["action"] == "rollback" and "error rate" in last["reasons"][0] and last["numbers"]["candidate"]["error_rate"] > 0.01
        assert 0.05 < server.observations.window("enc", "2").error_rate < 0.5  # about 1 in 5 of its requests failed
        during = seen.statuses[before:after]
        assert seen.failed and set(seen.failed_texts) == {FAIL_TEXT}  # only the marked requests the candidate answered failed
        assert seen.failed / len(during) <= share / 100, f"{seen.failed} of {len(during)} failed"
        assert server.repository.routers["enc"].policy.describe() == {"policy": "single", "version": "1"}
        await wait_for(lambda: "2" not in server.repository.routers["enc"].versions, 10, "the candidate to unload")


@pytest.mark.anyio
async def test_a_slower_candidate_is_rolled_back_on_p99_and_no_client_sees_an_error(tiny_encoder):
    server = make_server()
    async with client_for(server) as c:
        base = await load_version(server, str(tiny_encoder), "enc", "1", faulty=True)
        server.repository.routers["enc"].set_policy(SinglePolicy("1"))
        slow = await load_version(server, str(tiny_encoder), "enc", "2", faulty=True)
        base.delay_s, slow.delay_s = 0.01, 0.05  # the model time is dominated by these: 5x slower
        window = 0.6
        async with steady_traffic(c, "enc", clients=2) as seen:  # little queueing: latency is mostly model time
            await wait_for(lambda: len(seen.statuses) > 20, 30, "traffic")
            await server.rollouts.start(
                "enc", {"candidate": "2", "steps": [25, 50], "window_s": window, "min_requests": 10, "max_p99_ratio": 1.5}
            )
            await wait_for(lambda: server.rollouts.get("enc").status not in ACTIVE, ROLLOUT_TIMEOUT_S, "the rollback")
        ro = server.rollouts.get("enc")
        assert ro.status == "rolled_back", ro.events  # at whichever step a busy machine first shows the gap
        last = ro.events[-1]
        assert "p99" in last["reasons"][0] and last["numbers"]["p99_ratio"] > 1.5
        assert seen.failed == 0  # slow, not failing: no client saw an error


@pytest.mark.anyio
async def test_shadow_then_canary_rolls_back_on_disagreement_and_blue_green_switches(tiny_encoder):
    server = make_server()
    async with client_for(server) as c:
        await load_version(server, str(tiny_encoder), "enc", "1")
        server.repository.routers["enc"].set_policy(SinglePolicy("1"))
        wrong = await load_version(server, str(tiny_encoder), "enc", "2", faulty=True)
        wrong.negate = True  # answers quickly, never fails, and is wrong: cosine -1 to the primary
        async with steady_traffic(c, "enc", clients=2) as seen:
            spec = {"candidate": "2", "strategy": "shadow-then-canary", "window_s": 0.3, "min_requests": 5, "max_p99_ratio": None}
            await server.rollouts.start("enc", spec)
            assert server.repository.routers["enc"].policy.describe()["policy"] == "shadow"
            await wait_for(lambda: server.rollouts.get("enc").status not in ACTIVE, ROLLOUT_TIMEOUT_S, "the shadow verdict")
        ro = server.rollouts.get("enc")
        assert ro.status == "rolled_back" and ro.state["step"] == 0 and ro.events[-1]["reasons"] == ["agreement -1.0000 < 0.99"]
        assert set(seen.versions) == {"1"} and seen.failed == 0  # in shadow the candidate never answered a client
        await load_version(server, str(tiny_encoder), "enc", "3")
        async with steady_traffic(c, "enc", clients=2) as seen:
            await server.rollouts.start(
                "enc", {"candidate": "3", "strategy": "blue-green", "window_s": 0.3, "min_requests": 5, "max_p99_ratio": 4.0}
            )
            await wait_for(lambda: server.rollouts.get("enc").phase["phase"] == "switch", ROLLOUT_TIMEOUT_S, "the switch")
            assert server.repository.routers["enc"].policy.describe() == {"policy": "single", "version": "3"}
            assert "1" in server.repository.routers["enc"].versions  # blue stays loaded while green is watched
            await wait_for(lambda: server.rollouts.get("enc").status not in ACTIVE, ROLLOUT_TIMEOUT_S, "the promotion")
        assert server.rollouts.get("enc").status == "succeeded" and seen.failed == 0
        assert [e["action"] for e in server.rollouts.get("enc").events] == ["start", "advance", "promote"]


@pytest.mark.anyio
async def test_restart_mid_rollout_resumes_from_the_registry_at_the_same_step(registry_url):
    cfg = {"registry": registry_url, "api_key": KEY, "models": [ModelConfig(source="tiny-enc@production", threads=1)]}
    spec = {"candidate": "2", "steps": [10, 40, 100], "window_s": 0.3, "min_requests": 3, "max_p99_ratio": 5.0}
    first = make_server(**cfg)
    async with client_for(first) as c:
        async with steady_traffic(c, "tiny-enc", clients=2):
            await first.rollouts.start("tiny-enc", spec)
            await wait_for(lambda: first.rollouts.get("tiny-enc").state["step"] == 1, ROLLOUT_TIMEOUT_S, "step 2")
        # no traffic now: the step holds (too few requests), so the state below is the one a restart must find
        before = (await c.get("/rollouts/tiny-enc", headers=AUTH)).json()
    assert before["status"] == "running" and before["weights"] == {"2": 40.0, "1": 60.0}
    second = make_server(**cfg)  # a new process would do the same: it knows only what the registry says
    async with client_for(second) as c:
        after = (await c.get("/rollouts/tiny-enc", headers=AUTH)).json()
        policy = second.repository.routers["tiny-enc"].policy
        assert after["status"] == "running" and after["step"] == 1 and after["weights"] == before["weights"]
        assert policy.describe() == before["policy"] and set(second.repository.routers["tiny-enc"].versions) == {"1", "2"}
        assert after["events"][-1]["action"] == "resume"
        async with steady_traffic(c, "tiny-enc", clients=2) as seen:
            await wait_for(lambda: second.rollouts.get("tiny-enc").status not in ACTIVE, ROLLOUT_TIMEOUT_S, "the rest of the canary")
        assert second.rollouts.get("tiny-enc").status == "succeeded" and seen.failed == 0
    with _registry(registry_url) as reg:
        actions = [e["decision"]["action"] for e in reg.rollouts.events("tiny-enc")]
    assert actions.count("start") == 1 and actions.count("resume") == 1 and actions[-1] == "promote"
    assert actions.count("advance") == 2  # step 1 -> 2 before the restart, 2 -> 3 after: none repeated


@pytest.mark.anyio
async def test_instant_rollback_under_concurrent_load_fails_nothing_and_records_what_registry_rollback_does(registry_url):
    with _registry(registry_url) as reg:
        reg.promote("tiny-enc:2", "production")
    server = make_server(registry=registry_url, api_key=KEY, models=[ModelConfig(source="tiny-enc@production", threads=1)])
    async with client_for(server) as c:
        async with steady_traffic(c, "tiny-enc", clients=4) as seen:
            await wait_for(lambda: len(seen.statuses) > 30, 30, "traffic")
            r = await c.post("/rollouts/tiny-enc/rollback", json={"why": "p99 doubled"}, headers=AUTH)
            assert r.status_code == 200, r.text
            n = len(seen.statuses)
            await wait_for(lambda: len(seen.statuses) > n + 30, 30, "traffic after the rollback")
        assert r.json() == {"model": "tiny-enc", "serving": "1", "from": "2", "registry_changed": True, "production": "tiny-enc:1"}
        assert seen.failed == 0 and seen.versions[0] == "2" and seen.versions[-1] == "1"
        assert set(server.repository.routers["tiny-enc"].versions) == {"1"}  # the version rolled back from drained and unloaded
        r = await c.post("/rollouts/tiny-enc/rollback", headers=AUTH)
        assert r.status_code == 400 and "nothing to roll back to" in r.json()["error"]
    with _registry(registry_url) as reg:
        last = reg.get("tiny-enc:1").stage_history[-1]
        assert (last["from"], last["to"], last["action"]) == ("archived", "production", "rollback")
        assert reg.get("tiny-enc:2").stage == "archived" and "p99 doubled" in last["why"]
        assert reg.rollouts.events("tiny-enc")[-1]["decision"]["action"] == "rollback"


@pytest.mark.anyio
async def test_management_api_keys_states_feedback_and_report(tiny_encoder):
    server = make_server(api_key=KEY)
    async with client_for(server) as c:
        await load_version(server, str(tiny_encoder), "enc", "1")
        server.repository.routers["enc"].set_policy(SinglePolicy("1"))
        await load_version(server, str(tiny_encoder), "enc", "2")
        ab = {"candidate": "2", "strategy": "ab", "steps": [50], "window_s": 0.2, "min_requests": 3, "max_p99_ratio": None}
        assert (await c.post("/rollouts/enc/start", json=ab)).status_code == 401
        assert (await c.get("/rollouts/enc", headers={"x-api-key": "wrong-key-0000"})).status_code == 401
        r = await c.post("/rollouts/enc/start", json={**ab, "steps": [150]}, headers=AUTH)
        assert r.status_code == 400 and "steps" in r.json()["error"]
        assert (await c.get("/rollouts/nope", headers=AUTH)).status_code == 404
        assert (await c.post("/rollouts/enc/start", json=ab, headers=AUTH)).status_code == 201
        r = await c.post("/rollouts/enc/start", json=ab, headers=AUTH)
        assert r.status_code == 409 and "rollout abort enc" in r.json()["error"]
        ids: dict[str, list[str]] = {"1": [], "2": []}
        for i in range(80):
            r = await c.post("/v2/models/enc/infer", json=text_request([f"q {i}"]))
            ids[r.json()["model_version"]].append(r.headers["x-request-id"])
        assert len(ids["1"]) > 20 and len(ids["2"]) > 20  # a 50/50 split (no user key: random)
        outcomes = [{"request_id": rid, "value": 1.0 if v == "2" else 0.0, "metric": "clicked"} for v in ids for rid in ids[v]]
        assert (await c.post("/feedback", json={"outcomes": outcomes})).status_code == 401
        r = await c.post("/feedback", json={"outcomes": outcomes}, headers=AUTH)
        assert r.status_code == 200 and len(r.json()["recorded"]) == 80
        r = await c.post("/feedback", json={"request_id": "unknown", "value": 1}, headers=AUTH)
        assert r.status_code == 404 and "x-request-id" in r.json()["error"]
        await wait_for(lambda: server.rollouts.get("enc").state.get("windows", 0) >= 1, 20, "an A/B window")
        assert server.rollouts.get("enc").events[-1]["action"] == "window"  # ab never advances; each window is recorded
        rep = (await c.get("/rollouts/enc/report", headers=AUTH)).json()
        clicked = [t for t in rep["tests"] if t["metric"] == "clicked"]
        assert rep["significant"] and all(t["significant"] for t in clicked)
        assert rep["versions"]["2"]["outcomes"]["clicked"]["mean"] == 1.0
        for verb, status in (("pause", "paused"), ("resume", "running"), ("pause", "paused")):
            r = await c.post(f"/rollouts/enc/{verb}", headers=AUTH)
            assert r.status_code == 200 and r.json()["status"] == status
        assert (await c.post("/rollouts/enc/pause", headers=AUTH)).status_code == 409
        r = await c.post("/rollouts/enc/promote", headers=AUTH)
        assert r.json()["status"] == "succeeded" and r.json()["promoted"] is None  # not from the registry: nothing to promote there
        assert server.repository.routers["enc"].policy.describe() == {"policy": "single", "version": "2"}
        assert (await c.post("/rollouts/enc/abort", headers=AUTH)).status_code == 409
        actions = [e["action"] for e in (await c.get("/rollouts/enc/events", headers=AUTH)).json()]
        assert actions[0] == "start" and actions[-4:] == ["pause", "resume", "pause", "promote"]
        assert "enc" in (await c.get("/rollouts", headers=AUTH)).json()
    await asyncio.sleep(0)


# -- a real process killed mid-canary ---------------------------------------------------------
SERVER_START_TIMEOUT_S = 120  # a fresh interpreter imports torch and loads two tiny models


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_server(registry_url: str, port: int, log_path):
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-c",
        "from modelpress.cli import main; main()",
        "serve",
        "tiny-enc@production",
        "--registry",
        registry_url,
        "--port",
        str(port),
        "--api-key",
        KEY,
        "--threads",
        "1",
        "--log-level",
        "warning",
    ]
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_ready(url: str, proc, log_path) -> None:
    import httpx

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the server did not get ready in {SERVER_START_TIMEOUT_S} s: {log_path.read_text()[-3000:]}")


@pytest.mark.slow
def test_sigkill_mid_canary_then_restart_resumes_at_the_same_step_with_the_same_weights(registry_url, tmp_path):
    import threading

    import httpx

    port = _free_port()
    url, log_path = f"http://127.0.0.1:{port}", tmp_path / "server.log"
    proc = _spawn_server(registry_url, port, log_path)
    try:
        _wait_ready(url, proc, log_path)
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    c.post("/v2/models/tiny-enc/infer", json=text_request(["steady traffic"]))

        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            # This test is about resuming, not about the SLO checks: the thresholds are loose so a
            # loaded machine's latency spikes cannot roll the canary back before the kill.
            spec = {
                "candidate": "2",
                "steps": [10, 40, 100],
                "window_s": 1.5,
                "min_requests": 3,
                "max_p99_ratio": 1000.0,
                "max_error_rate": 0.5,
            }
            assert c.post("/rollouts/tiny-enc/start", json=spec).status_code == 201
            senders = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
            for t in senders:
                t.start()
            deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
            while (status := c.get("/rollouts/tiny-enc").json())["step"] != 1:
                assert time.monotonic() < deadline and status["status"] in ("loading", "running"), status
                time.sleep(0.05)
            proc.kill()  # SIGKILL, a fraction of a second into the second step's 1.5 s window
            proc.wait(30)
            stop.set()
            for t in senders:
                t.join(30)
        assert status["weights"] == {"2": 40.0, "1": 60.0}
        proc = _spawn_server(registry_url, port, log_path)
        _wait_ready(url, proc, log_path)
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            after = c.get("/rollouts/tiny-enc").json()
            served = c.get("/v2/models/tiny-enc").json()
        assert after["status"] == "running" and after["step"] == 1 and after["weights"] == status["weights"]
        assert served["parameters"]["policy"] == status["policy"] and served["versions"] == ["1", "2"]
        assert [e["action"] for e in after["events"]][-1] == "resume"
    finally:
        proc.kill()
        proc.wait(30)


def test_rollout_cli_against_a_running_server(registry_url):
    import httpx
    from typer.testing import CliRunner

    from modelpress.cli import app
    from modelpress.cli.rollout import parse_duration, parse_rate, parse_steps

    assert (parse_duration("200ms"), parse_duration("60s"), parse_duration("5m"), parse_duration("0.5")) == (0.2, 60.0, 300.0, 0.5)
    assert (parse_rate("1%"), parse_rate("0.02"), parse_steps("5,25,50,100")) == (0.01, 0.02, [5.0, 25.0, 50.0, 100.0])
    for fn, bad, message in (
        (parse_duration, "soon", "not a duration"),
        (parse_rate, "150%", "between 0 and 100%"),
        (parse_steps, "5,x", "percentages"),
    ):
        with pytest.raises(ConfigError, match=message):
            fn(bad)
    cli = CliRunner()
    server = make_server(registry=registry_url, api_key=KEY, models=[ModelConfig(source="tiny-enc@production", threads=1)])
    with server.in_thread() as running:
        base = ["--url", running.url, "--api-key", KEY]
        r = cli.invoke(
            app,
            [
                "rollout",
                "start",
                "tiny-enc",
                "--candidate",
                "2",
                "--strategy",
                "canary",
                "--steps",
                "50,100",
                "--window",
                "200ms",
                "--max-error-rate",
                "1%",
                "--max-p99-ratio",
                "5",
                "--min-agreement",
                "0.99",
                "--min-requests",
                "3",
                *base,
            ],
        )
        assert r.exit_code == 0 and "canary rollout 1 -> 2 is loading" in r.output and "step 1/2" in r.output, r.output
        assert "version 2 is loading; the first step begins once it is ready" in r.output, r.output
        with httpx.Client(base_url=running.url, timeout=30) as c:
            deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
            while True:
                c.post("/v2/models/tiny-enc/infer", json=text_request(["cli traffic"]))
                doc = json.loads(cli.invoke(app, ["rollout", "status", "tiny-enc", "--json", *base]).output)
                if doc["status"] not in ACTIVE:
                    break
                assert time.monotonic() < deadline, doc
        assert doc["status"] == "succeeded" and doc["promoted"] == "tiny-enc:2"
        r = cli.invoke(app, ["rollout", "report", "tiny-enc", *base])
        assert r.exit_code == 0 and "error_rate" in r.output and "significant" in r.output.lower() and "p99 ms" in r.output, r.output
        r = cli.invoke(app, ["rollback", "tiny-enc", "--why", "cli test", *base])
        assert r.exit_code == 0 and "now serves version 1; the registry has tiny-enc:1 in production again" in r.output, r.output
        r = cli.invoke(app, ["rollout", "status", "nope", *base])
        assert r.exit_code == 2 and "No rollout of 'nope'" in r.output
        r = cli.invoke(app, ["rollout", "pause", "tiny-enc", "--url", running.url, "--api-key", "wrong-key-00000"])
        assert r.exit_code == 2 and "API key" in r.output
    r = cli.invoke(app, ["rollback", "tiny-enc", "--url", "http://127.0.0.1:9", "--api-key", KEY])
    assert r.exit_code == 2 and "Cannot reach the modelpress server" in r.output and "registry rollback" in r.output
    with _registry(registry_url) as reg:
        assert reg.get("tiny-enc@production").version == 1


@pytest.mark.anyio
async def test_a_policy_changed_by_hand_or_an_unloaded_model_ends_the_rollout_without_touching_traffic(tiny_encoder):
    server = make_server()
    async with client_for(server):
        await load_version(server, str(tiny_encoder), "enc", "1")
        server.repository.routers["enc"].set_policy(SinglePolicy("1"))
        await load_version(server, str(tiny_encoder), "enc", "2")
        await server.rollouts.start("enc", {"candidate": "2", "window_s": 0.2})
        server.repository.routers["enc"].set_policy(SinglePolicy("2"))  # an operator points traffic elsewhere
        await wait_for(lambda: server.rollouts.get("enc").status not in ACTIVE, 10, "the rollout to notice")
        ro = server.rollouts.get("enc")
        assert ro.status == "aborted" and "changed outside the rollout" in ro.events[-1]["reasons"][0]
        assert server.repository.routers["enc"].policy.describe() == {"policy": "single", "version": "2"}  # left as the operator set it
