"""Every in-memory map of the rollouts is bounded, whatever clients send (one test per map), and the
dashboard's series cannot be asked for an unbounded number of buckets."""

from __future__ import annotations

import pytest

from modelpress.errors import ConfigError, InvalidInputError, RolloutConflictError, RolloutNotFoundError
from modelpress.rollout import observations as obs_module
from modelpress.rollout.controller import RolloutManager
from modelpress.rollout.observations import MAX_METRICS_PER_MODEL, MAX_SERIES_BUCKETS, Observations

from .conftest import client_for, make_server
from .test_rollout_windows import FakeClock, FakeRepository

KEY = "test-key-123456"
AUTH = {"x-api-key": KEY}


def test_versions_with_records_are_bounded_and_unloaded_ones_dropped_past_a_few():
    loaded = {("m", "1"), ("m", "2")}
    obs = Observations()
    obs.is_loaded = lambda model, version: (model, version) in loaded
    for v in ("1", "2"):
        obs.answered("m", v, 0.01, True, request_id=f"r{v}")
    for i in range(3, 3 + obs_module.MAX_UNLOADED_KEPT + 5):  # versions that answered, then went away
        obs.answered("m", str(i), 0.01, True)
        obs.shadow("m", str(i), 0.01, ok=True, agreement=1.0)
        obs.shadow_dropped("m", str(i))
    kept = set(obs.live)
    assert {("m", "1"), ("m", "2")} <= kept  # loaded versions are never dropped for unloaded ones
    assert len(kept - loaded) <= obs_module.MAX_UNLOADED_KEPT + 1  # + the one that just answered
    assert set(obs.shadows) <= kept and set(obs.dropped) <= kept and set(obs._keys) == kept
    obs.is_loaded = None
    obs.max_versions = 5
    for i in range(100, 140):  # with nothing to tell loaded from unloaded: the least recently active go
        obs.answered("x", str(i), 0.01, True)
    assert len(obs._keys) == len(obs.live) == 5 and ("x", "139") in obs.live
    assert obs.prune() == [] and obs.window("x", "139").n == 1


def test_outcome_metrics_are_bounded_in_number_and_spelling():
    obs = Observations()
    obs.answered("m", "1", 0.01, True, request_id="req-1")
    for i in range(MAX_METRICS_PER_MODEL):
        obs.feedback("req-1", 1.0, f"metric_{i}")
    with pytest.raises(ConfigError, match=f"at most {MAX_METRICS_PER_MODEL}"):
        obs.feedback("req-1", 1.0, "one_too_many")
    obs.feedback("req-1", 2.0, "metric_0")  # a known name still takes values
    for bad in ("", "x" * 65, "has space", "<script>", "1starts_with_digit", 5):
        with pytest.raises(ConfigError, match="metric name"):
            obs.feedback("req-1", 1.0, bad)  # type: ignore[arg-type]
    assert len(obs.metrics_of("m")) == MAX_METRICS_PER_MODEL
    small = Observations(max_records=3)
    small.answered("m", "1", 0.01, True, request_id="r")
    for v in range(10):
        small.feedback("r", float(v), "clicked")
    assert list(small.outcome_values("m", "1", "clicked")) == [7.0, 8.0, 9.0]


def test_request_ids_are_bounded_and_a_reused_id_never_lands_on_someone_elses_request():
    obs = Observations(max_request_ids=10)
    for i in range(25):
        obs.answered("m", "1", 0.01, True, request_id=f"id-{i}")
    assert len(obs._requests) == 10 and "id-24" in obs._requests and "id-0" not in obs._requests
    obs.answered("m", "1", 0.01, True, request_id="victim-7")  # a client's own, guessable id
    obs.answered("m", "2", 0.01, True, request_id="victim-7")  # someone else sends the same id
    with pytest.raises(RolloutConflictError, match="more than one request"):
        obs.feedback("victim-7", 1.0, "clicked")
    assert obs.metrics_of("m") == []  # nothing landed on either version
    obs.answered("other", "1", 0.01, True, request_id="mine")
    with pytest.raises(RolloutNotFoundError, match="of m"):
        obs.feedback("mine", 1.0, "clicked", model="m")  # feedback names the model: another model's request is not found
    assert obs.feedback("mine", 1.0, "clicked", model="other") == ("other", "1")


def test_a_series_has_a_bounded_number_of_buckets_and_is_one_pass_over_the_records():
    clock = FakeClock()
    obs = Observations(clock=clock)
    for i in range(20_000):
        clock.now += 0.05
        obs.answered("m", "1", 0.01, ok=i % 50 != 0)
    with pytest.raises(InvalidInputError, match=f"at most {MAX_SERIES_BUCKETS:,}"):
        obs.timeseries("m", "1", span_s=3600, bucket_s=0.1)
    series = obs.timeseries("m", "1", span_s=3600, bucket_s=1.0)
    assert len(series) <= MAX_SERIES_BUCKETS and sum(r["requests"] for r in series) == 20_000
    assert all(r["requests"] == 20 for r in series[1:-1]) and series[5]["error_rate"] in (0.0, 0.05)


def test_rollouts_held_are_bounded_by_the_served_models_and_their_events_in_memory():
    repo = FakeRepository()
    clock = FakeClock()
    mgr = RolloutManager(repo, Observations(clock=clock), clock=clock)

    async def run() -> None:
        await mgr.start("m", {"candidate": "2", "window_s": 60})
        ro = mgr.get("m")
        ro.task.cancel()
        for _ in range(mgr.MAX_EVENTS_IN_MEMORY + 50):
            await mgr.persist(ro, ro.event("hold", reasons=["waiting"]))
        assert len(ro.events) == mgr.MAX_EVENTS_IN_MEMORY
        await mgr.abort("m")
        del repo.routers["m"]  # the model is no longer served
        mgr._forget_unserved()
        assert mgr.rollouts == {}
        await mgr.close()

    import asyncio

    asyncio.run(run())


@pytest.mark.anyio
async def test_dashboard_data_refuses_tiny_buckets_over_long_spans_and_feedback_batches_are_bounded():
    from modelpress.rollout.api import MAX_OUTCOMES_PER_REQUEST

    server = make_server(api_key=KEY)
    async with client_for(server) as c:
        server.observations.answered("m", "1", 0.01, True, request_id="r1")
        server.observations.is_loaded = lambda model, version: True
        r = await c.get("/dashboard/data", params={"span": 3600, "bucket": 0.1})
        assert r.status_code == 400 and f"at most {MAX_SERIES_BUCKETS:,}" in r.json()["error"]
        assert (await c.get("/dashboard/data", params={"span": 3600, "bucket": 1})).status_code == 200
        many = {"outcomes": [{"request_id": "r1", "value": 1.0}] * (MAX_OUTCOMES_PER_REQUEST + 1)}
        r = await c.post("/feedback", json=many, headers=AUTH)
        assert r.status_code == 400 and f"1 to {MAX_OUTCOMES_PER_REQUEST:,}" in r.json()["error"]
        r = await c.post("/feedback", json={"request_id": ["not", "a", "string"], "value": 1.0}, headers=AUTH)
        assert r.status_code == 400
        r = await c.post("/feedback", json={"request_id": "r1", "value": 1.0, "metric": "a b"}, headers=AUTH)
        assert r.status_code == 400 and "metric name" in r.json()["error"]
