"""The rollout controller: canaries that promote or roll back on live numbers, restarts, instant rollback."""

from __future__ import annotations

import asyncio

import pytest

from modelpress.rollout.spec import ACTIVE
from modelpress.serving.config import ModelConfig
from modelpress.serving.routing import SinglePolicy

from .conftest import client_for, make_server, registry_at, text_request
from .rollout_support import FAIL_TEXT, fail_token_of, load_version, steady_traffic, wait_for

KEY = "test-key-123456"
AUTH = {"x-api-key": KEY}
ROLLOUT_TIMEOUT_S = 60  # a rollout of 0.2-0.6 s windows ends in seconds; this only bounds a hung one
# How many windows a decision takes is tested on a fake clock (test_rollout_windows.py); the tests
# here hold a real server under real traffic to what clients see.


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
    with registry_at(registry_url) as reg:
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
    with registry_at(registry_url) as reg:
        actions = [e["decision"]["action"] for e in reg.rollouts.events("tiny-enc")]
    assert actions.count("start") == 1 and actions.count("resume") == 1 and actions[-1] == "promote"
    assert actions.count("advance") == 2  # step 1 -> 2 before the restart, 2 -> 3 after: none repeated


@pytest.mark.anyio
async def test_instant_rollback_under_concurrent_load_fails_nothing_and_records_what_registry_rollback_does(registry_url):
    with registry_at(registry_url) as reg:
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
    with registry_at(registry_url) as reg:
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
