"""Traffic policies: weighted splits converge, sticky keys stay put, shadow copies never touch the client."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from modelpress.errors import ConfigError, ModelNotReadyError
from modelpress.rollout.routing import BUCKETS, ShadowPolicy, SplitPolicy, policy_from_json
from modelpress.serving.routing import Decision, RequestContext, Router, SinglePolicy

from .conftest import client_for, make_server, text_request
from .rollout_support import load_version

N_DRAWS = 20_000
SHARE_TOLERANCE = 0.015  # 20,000 seeded draws: a share's standard error is at most 0.35 %, so 1.5 % is over 4 sigma
SHADOW_P99_BUDGET_S = 0.001  # the bound: a failing shadow adds no more than 1 ms to the client's p99
P99_ROUNDS = 5  # client p99s on a shared 2-core machine move by several ms between rounds: the bound must hold in one of them
P99_PAIRS = 200  # interleaved requests per round and model


def test_split_weights_converge_seeded():
    policy = SplitPolicy({"a": 10, "b": 30, "c": 60}, seed=3)
    counts = Counter(policy.choose({}, RequestContext()).primary for _ in range(N_DRAWS))
    for label, share in (("a", 0.10), ("b", 0.30), ("c", 0.60)):
        assert abs(counts[label] / N_DRAWS - share) < SHARE_TOLERANCE, counts
    stream = lambda: [p.choose({}, RequestContext()).primary for p in [SplitPolicy({"a": 10, "b": 30, "c": 60}, seed=3)] for _ in range(50)]  # noqa: E731
    assert stream() == stream()  # the same seed, the same stream
    # weights are normalised; a zero weight gets nothing and is not a target
    zero = SplitPolicy({"a": 0, "b": 2}, seed=1)
    assert {zero.choose({}, RequestContext()).primary for _ in range(500)} == {"b"}
    assert zero.targets() == {"b"} and zero.weights() == {"a": 0.0, "b": 100.0} and zero.main == "b"


def test_sticky_routing_is_stable_per_key_and_a_growing_canary_keeps_its_users():
    users = [f"user-{i}" for i in range(4000)]
    policy = SplitPolicy({"2": 25, "1": 75}, sticky=True)
    first = {u: policy.choose({}, RequestContext(key=u)).primary for u in users}
    for _ in range(3):  # the same key, the same version, every time (and via the header)
        assert all(policy.choose({}, RequestContext(headers={"x-user-id": u})).primary == v for u, v in first.items())
    share = sum(v == "2" for v in first.values()) / len(users)
    assert abs(share - 0.25) < 0.03  # 4,000 keys: standard error 0.7 %
    # another process hashes the same: the bucket is blake2b of the key, not Python's salted hash()
    assert SplitPolicy({"a": 1}).bucket("user-42") == 4720 and SplitPolicy({"a": 1}, salt="enc").bucket("user-42") == 2047
    assert 0 <= policy.bucket("x") < BUCKETS
    # a canary listed first owns the low buckets: raising its share keeps everyone it had
    on_canary = {}
    for w in (5, 25, 50, 100):
        step = SplitPolicy({"2": w, "1": 100 - w}, sticky=True)
        now = {u for u in users if step.choose({}, RequestContext(key=u)).primary == "2"}
        assert all(u in now for u in on_canary.get("prev", set()))
        on_canary["prev"] = now
    assert len(on_canary["prev"]) == len(users)
    # no key: random (both versions get requests)
    assert {policy.choose({}, RequestContext()).primary for _ in range(200)} == {"1", "2"}


def test_policies_round_trip_through_json_and_reject_bad_input():
    for policy in (
        SinglePolicy("3"),
        SplitPolicy({"2": 5, "1": 95}, sticky=True, sticky_header="X-Tenant"),
        ShadowPolicy("1", "2", 0.25, seed=4),
    ):
        again = policy_from_json(policy.describe())
        assert type(again) is type(policy) and again.describe() == policy.describe() and again.targets() == policy.targets()
    assert policy_from_json({"policy": "split", "weights": {"2": 5, "1": 95}, "sticky": True}).sticky_header == "x-user-id"
    for bad, message in [
        ({"policy": "weighted"}, "not a traffic policy"),
        ({"policy": "split"}, "lacks 'weights'"),
        ({"version": "1"}, "with a 'policy' key"),
        ({"policy": "split", "weights": {"1": -1}}, "finite number >= 0"),
        ({"policy": "split", "weights": {"1": 0, "2": 0}}, "at least one version must get traffic"),
        ({"policy": "split", "weights": {}}, "at least one version"),
        ({"policy": "shadow", "primary": "1", "candidate": "1"}, "the primary itself"),
        ({"policy": "shadow", "primary": "1", "candidate": "2", "fraction": 1.5}, r"in \(0, 1\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            policy_from_json(bad)


def test_router_checks_targets_and_reports_the_main_version():
    router: Router = Router("m")
    with pytest.raises(ModelNotReadyError):
        router.route(RequestContext())
    router.add("1", "v1")
    with pytest.raises(ConfigError, match="version\\(s\\) 2, which are not loaded"):
        router.set_policy(SplitPolicy({"2": 50, "1": 50}))
    router.add("2", "v2")
    router.set_policy(SplitPolicy({"2": 10, "1": 90}, seed=0))
    assert router.default_version == "1"
    with pytest.raises(ConfigError, match="still receives traffic"):
        router.remove("2")
    router.set_policy(ShadowPolicy("1", "2"))
    assert router.route(RequestContext()) == ("v1", Decision("1", ("2",)))
    assert router.route(RequestContext(), version="2") == ("v2", Decision("2"))


async def _p99_pair(c, with_shadow: str, without: str, n: int) -> tuple[float, float]:
    a, b = [], []
    for i in range(n):  # interleaved, so drift on the machine hits both alike
        for model, out in ((with_shadow, a), (without, b)):
            t0 = time.perf_counter()
            r = await c.post(f"/v2/models/{model}/infer", json=text_request([f"timing {i}"]))
            out.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return float(np.percentile(a, 99)), float(np.percentile(b, 99))


@pytest.mark.anyio
async def test_a_shadow_that_raises_on_every_request_never_fails_or_slows_the_client(tiny_encoder):
    server = make_server()
    async with client_for(server) as c:
        for name in ("shadowed", "plain"):
            await load_version(server, str(tiny_encoder), name, "1")
            server.repository.routers[name].set_policy(SinglePolicy("1"))
        faulty = await load_version(server, str(tiny_encoder), "shadowed", "2", faulty=True)
        faulty.always = True
        server.repository.routers["shadowed"].set_policy(ShadowPolicy("1", "2"))
        statuses, versions = [], []
        for i in range(60):
            r = await c.post("/v2/models/shadowed/infer", json=text_request([f"request {i}"]))
            statuses.append(r.status_code)
            versions.append(r.json().get("model_version"))
        await server.mirror.wait(10)
        assert set(statuses) == {200} and set(versions) == {"1"}
        shadow = server.observations.shadow_window("shadowed", "2")
        assert shadow.n == 60 and shadow.errors == 60 and faulty.calls >= 60  # every copy ran and failed, recorded
        assert server.observations.window("shadowed", "2").n == 0  # no client request was answered by the candidate
        # what mirroring adds on the request's own path is creating the background task: microseconds
        send_times = []
        router, lv = server.repository.routers["shadowed"], server.repository.routers["shadowed"].versions["1"]
        decoded = lv.handler.decode(["x"])
        for _ in range(200):
            t0 = time.perf_counter()
            server.mirror.send(router, Decision("1", ("2",)), lambda h: decoded, lv, [np.zeros(32)])
            send_times.append(time.perf_counter() - t0)
        await server.mirror.wait(10)
        # well under the 1 ms budget even on a loaded machine (measured: p50 2.5 us, p99 27-135 us)
        assert np.percentile(send_times, 99) < SHADOW_P99_BUDGET_S / 2
        rounds = []
        for _ in range(P99_ROUNDS):
            p99_with, p99_without = await _p99_pair(c, "shadowed", "plain", P99_PAIRS)
            rounds.append(p99_with - p99_without)
            if rounds[-1] <= SHADOW_P99_BUDGET_S:
                break
        assert min(rounds) <= SHADOW_P99_BUDGET_S, f"the failing shadow added {[round(r * 1000, 3) for r in rounds]} ms to the client p99"


@pytest.mark.anyio
async def test_a_slow_shadow_never_delays_the_client_and_its_latency_is_recorded(tiny_encoder):
    server = make_server()
    async with client_for(server) as c:
        await load_version(server, str(tiny_encoder), "enc", "1")
        slow = await load_version(server, str(tiny_encoder), "enc", "2", faulty=True)
        slow.delay_s = 0.4
        server.repository.routers["enc"].set_policy(ShadowPolicy("1", "2"))
        seconds = []
        for i in range(6):
            t0 = time.perf_counter()
            r = await c.post("/v2/models/enc/infer", json=text_request([f"request {i}"]))
            seconds.append(time.perf_counter() - t0)
            assert r.status_code == 200 and r.json()["model_version"] == "1"
        assert max(seconds) < 0.2, seconds  # each answer came long before its 0.4 s shadow copy finished
        assert server.mirror.inflight > 0
        await server.mirror.wait(20)
        shadow = server.observations.shadow_window("enc", "2")
        assert shadow.n == 6 and shadow.errors == 0 and shadow.p50 >= 0.4
        assert shadow.agreement == pytest.approx(1.0, abs=1e-5)  # the same weights: cosine 1


@pytest.mark.anyio
async def test_shadow_agreement_and_sticky_split_in_the_server(tiny_encoder, tiny_classifier):
    server = make_server()
    async with client_for(server) as c:
        await load_version(server, str(tiny_classifier), "cls", "1")
        await load_version(server, str(tiny_classifier), "cls", "2")
        server.repository.routers["cls"].set_policy(ShadowPolicy("1", "2", fraction=0.5, seed=1))
        for i in range(40):
            assert (await c.post("/v2/models/cls/infer", json=text_request([f"a film {i}", "another"]))).status_code == 200
        await server.mirror.wait(10)
        shadow = server.observations.shadow_window("cls", "2")
        assert 8 <= shadow.n <= 32 and shadow.agreement == 1.0  # about half mirrored; same model, same labels
        # a sticky split by header: each user always lands on the same version
        server.repository.routers["cls"].set_policy(SplitPolicy({"2": 50, "1": 50}, sticky=True))
        seen: dict[str, set[str]] = {}
        for _ in range(3):
            for u in range(20):
                r = await c.post("/v2/models/cls/infer", json=text_request(["x"]), headers={"x-user-id": f"u{u}"})
                seen.setdefault(f"u{u}", set()).add(r.json()["model_version"])
        assert all(len(v) == 1 for v in seen.values()) and {next(iter(v)) for v in seen.values()} == {"1", "2"}
        assert (await c.get("/v2/models/cls")).json()["parameters"]["policy"]["policy"] == "split"


class _HeldCandidate:
    """A candidate version whose answers wait until the test opens ``gate`` (the model itself does not matter here)."""

    def __init__(self, gate) -> None:
        from types import SimpleNamespace

        self.gate = gate
        self.handler = SimpleNamespace(kind="text")
        self.batcher = SimpleNamespace(accepting=True)
        self.calls = 0

    async def infer(self, decoded):
        self.calls += 1
        await self.gate.wait()
        return [decoded], decoded


@pytest.mark.anyio
async def test_mirrored_copies_past_the_in_flight_bound_are_dropped_and_counted():
    import asyncio

    from modelpress.serving.routing import MAX_SHADOW_INFLIGHT, Mirror

    assert Mirror().max_inflight == MAX_SHADOW_INFLIGHT  # the server's mirror uses the bound
    bound, sent = 3, 8
    gate = asyncio.Event()
    router: Router = Router("m")
    candidate = _HeldCandidate(gate)
    router.add("2", candidate)
    mirror = Mirror(max_inflight=bound)

    class Observer:
        def __init__(self) -> None:
            self.dropped_calls: list[tuple[str, str]] = []
            self.answered_calls = 0

        def dropped(self, model, version):
            self.dropped_calls.append((model, version))

        def failed(self, candidate, seconds, error):
            raise AssertionError(f"a held copy failed: {error!r}")

        def answered(self, primary, primary_results, candidate, results, seconds):
            self.answered_calls += 1

    observer = Observer()
    mirror.observers.append(observer)
    for i in range(sent):
        mirror.send(router, Decision("1", ("2",)), lambda handler, i=i: f"request {i}", object(), [])
    assert mirror.inflight == bound
    assert mirror.dropped == sent - bound and observer.dropped_calls == [("m", "2")] * (sent - bound)
    gate.set()
    await mirror.wait(timeout=10)
    assert mirror.inflight == 0 and observer.answered_calls == bound and candidate.calls == bound
    mirror.send(router, Decision("1", ("2",)), lambda handler: "after", object(), [])  # room again: sent, not dropped
    await mirror.wait(timeout=10)
    assert observer.answered_calls == bound + 1 and mirror.dropped == sent - bound
