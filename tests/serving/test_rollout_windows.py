"""The rollout controller's decisions, window by window, on a fake clock: no model, no traffic, no sleeping
(and, at the end, the verdict of one window and the phases of each strategy).

Each test serves fake versions of one model through a stand-in repository, records what the
versions "did" straight into the Observations at fake times, moves the clock, and asks the
rollout to judge its window (:meth:`Rollout.check`, what the watcher does every tick).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from modelpress.errors import ConfigError, RolloutConflictError
from modelpress.rollout.analysis import WindowStats, evaluate
from modelpress.rollout.controller import RolloutManager
from modelpress.rollout.observations import Observations
from modelpress.rollout.spec import RolloutSpec, parse_spec, phases_of
from modelpress.serving.routing import Router, SinglePolicy

from .rollout_support import wait_for

pytestmark = pytest.mark.anyio
WINDOW_S = 60.0
LOAD_TIMEOUT_S = 10  # a background "load" here is an asyncio event: it never takes long


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeVersion:
    name: str
    version: str
    runtime: str = "torch"
    registry_ref: str | None = None
    load_seconds: float = 0.25


class FakeRepository:
    """The parts of a ModelRepository the controller uses; ``load`` waits for ``release`` (a slow load)."""

    def __init__(self, name: str = "m", *labels: str) -> None:
        self.routers: dict[str, Router] = {}
        router: Router = Router(name)
        for label in labels or ("1", "2"):
            router.add(label, FakeVersion(name, label))
        router.set_policy(SinglePolicy((labels or ("1",))[0]))
        self.routers[name] = router
        self.release = asyncio.Event()
        self.fail: Exception | None = None
        self.loads: list[dict[str, Any]] = []
        self.unloaded: list[str] = []

    def names(self) -> list[str]:
        return sorted(self.routers)

    def config_for(self, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, **overrides}

    async def load(self, cfg: dict[str, Any], *, make_default: bool, retire_previous: bool) -> FakeVersion:
        assert not make_default and not retire_previous  # a candidate joins the router without taking traffic
        self.loads.append(cfg)
        await asyncio.wait_for(self.release.wait(), LOAD_TIMEOUT_S)
        if self.fail is not None:
            raise self.fail
        lv = FakeVersion(cfg["name"], cfg["version"], runtime=cfg.get("runtime") or "onnxruntime")
        self.routers[cfg["name"]].add(cfg["version"], lv)
        return lv

    async def unload(self, name: str, label: str) -> None:
        self.routers[name].remove(label)
        self.unloaded.append(label)


def _manager(repo: FakeRepository) -> tuple[RolloutManager, FakeClock]:
    clock = FakeClock()
    return RolloutManager(repo, Observations(clock=clock), clock=clock), clock


async def _start(mgr: RolloutManager, spec: dict[str, Any], model: str = "m") -> Any:
    await mgr.start(model, {"window_s": WINDOW_S, **spec})
    ro = mgr.get(model)
    _stop_watching(ro)
    return ro


def _stop_watching(ro: Any) -> None:
    """The test judges the windows itself (the watcher would too, every second of real time)."""
    if ro.task is not None:
        ro.task.cancel()


def _requests(mgr: RolloutManager, version: str, n: int, *, errors: int = 0, seconds: float = 0.010, model: str = "m") -> None:
    for i in range(n):
        mgr.observations.answered(model, version, seconds, ok=i >= errors)


async def test_a_candidate_failing_20_percent_is_rolled_back_in_its_first_window():
    repo = FakeRepository()
    mgr, clock = _manager(repo)
    ro = await _start(mgr, {"candidate": "2", "steps": [20, 50], "min_requests": 10})
    assert repo.routers["m"].policy.describe()["weights"] == {"2": 20.0, "1": 80.0}
    clock.now += 10  # a sixth of the window: only an error rate that is clearly too high may end it this early
    _requests(mgr, "1", 80)
    _requests(mgr, "2", 20, errors=4)
    await ro.check()
    assert ro.status == "rolled_back" and ro.state["step"] == 0
    last = ro.events[-1]
    assert last["action"] == "rollback" and last["reasons"][0].startswith("error rate 20.00% (at least")
    assert last["numbers"]["candidate"]["errors"] == 4 and last["numbers"]["error_rate_low"] > 0.01
    assert repo.routers["m"].policy.describe() == {"policy": "single", "version": "1"} and repo.unloaded == ["2"]


async def test_a_small_error_rate_waits_for_the_end_of_the_window_then_breaches():
    mgr, clock = _manager(FakeRepository())
    ro = await _start(mgr, {"candidate": "2", "steps": [50], "min_requests": 10})
    _requests(mgr, "1", 30)
    _requests(mgr, "2", 30, errors=1)  # 3.3 %: above 1 %, but its 95 % lower bound is not
    clock.now += WINDOW_S - 1
    await ro.check()
    assert ro.status == "running" and [e["action"] for e in ro.events] == ["start"]
    clock.now += 1
    await ro.check()
    assert ro.status == "rolled_back" and ro.events[-1]["reasons"] == ["error rate 3.33% > 1.00%"]


async def test_a_3x_slower_candidate_is_rolled_back_on_p99_when_its_first_window_ends():
    repo = FakeRepository()
    mgr, clock = _manager(repo)
    ro = await _start(mgr, {"candidate": "2", "steps": [25, 50], "min_requests": 10, "max_p99_ratio": 1.5})
    _requests(mgr, "1", 90, seconds=0.010)
    _requests(mgr, "2", 30, seconds=0.030)
    clock.now += WINDOW_S / 2
    await ro.check()
    assert ro.status == "running"  # mid-window, latency is not judged
    clock.now += WINDOW_S / 2
    await ro.check()
    assert ro.status == "rolled_back" and ro.state["step"] == 0
    last = ro.events[-1]
    assert "p99 30.0 ms is 3.00x the baseline's 10.0 ms > 1.5x" in last["reasons"][0] and last["numbers"]["p99_ratio"] == 3.0
    assert repo.routers["m"].policy.describe() == {"policy": "single", "version": "1"}


async def test_a_thin_window_is_extended_and_at_100_percent_the_baselines_last_p99_is_the_reference():
    repo = FakeRepository()
    mgr, clock = _manager(repo)
    ro = await _start(mgr, {"candidate": "2", "steps": [25, 100], "min_requests": 10})
    _requests(mgr, "1", 90)
    _requests(mgr, "2", 30, seconds=0.011)
    clock.now += WINDOW_S
    await ro.check()
    assert ro.status == "running" and ro.state["step"] == 1 and ro.state["weights"] == {"2": 100.0}
    assert ro.state["reference_p99_ms"] == 10.0  # the baseline's p99, for the windows where it gets no traffic
    assert repo.routers["m"].policy.describe() == {"policy": "single", "version": "2"}
    _requests(mgr, "2", 5, seconds=0.030)  # too few requests to judge: the window is extended, once noted
    clock.now += WINDOW_S
    await ro.check()
    await ro.check()
    assert ro.status == "running" and [e["action"] for e in ro.events] == ["start", "advance", "hold"]
    _requests(mgr, "2", 5, seconds=0.011)
    await ro.check()
    assert ro.status == "rolled_back"  # 10 requests now, and their p99 (about 30 ms) is 3x the baseline's reference
    assert ro.events[-1]["numbers"]["baseline_p99_ms"] == 10.0


async def test_passing_every_window_promotes_and_keeps_the_old_version_standing_by():
    repo = FakeRepository()
    mgr, clock = _manager(repo)
    ro = await _start(mgr, {"candidate": "2", "steps": [50, 100], "min_requests": 10})
    for _step in range(2):
        _requests(mgr, "1", 20)
        _requests(mgr, "2", 20)
        clock.now += WINDOW_S
        await ro.check()
    assert ro.status == "succeeded" and [e["action"] for e in ro.events] == ["start", "advance", "promote"]
    assert repo.routers["m"].policy.describe() == {"policy": "single", "version": "2"}
    assert set(repo.routers["m"].versions) == {"1", "2"} and repo.unloaded == []  # `rollback` stays instant
    assert ro.describe()["phase"] == "done" and ro.describe()["window_elapsed_s"] is None


async def test_shadow_windows_judge_agreement_and_ab_windows_never_advance():
    mgr, clock = _manager(FakeRepository())
    ro = await _start(mgr, {"candidate": "2", "strategy": "shadow-then-canary", "min_requests": 5, "max_p99_ratio": None})
    assert ro.describe()["phase"] == "shadow" and ro.state["shadow"] == {"2": 1.0} and ro.state["weights"] == {"1": 100.0}
    _requests(mgr, "1", 10)
    for _ in range(10):
        mgr.observations.shadow("m", "2", 0.01, ok=True, agreement=0.5)
    clock.now += WINDOW_S
    await ro.check()
    assert ro.status == "rolled_back" and ro.events[-1]["reasons"] == ["agreement 0.5000 < 0.99"]

    mgr, clock = _manager(FakeRepository())
    ro = await _start(mgr, {"candidate": "2", "strategy": "ab", "steps": [30], "min_requests": 5})
    for _window in range(3):
        _requests(mgr, "1", 10)
        _requests(mgr, "2", 10)
        clock.now += WINDOW_S
        await ro.check()
    assert ro.status == "running" and ro.state["windows"] == 3 and ro.state["step"] == 0
    assert [e["action"] for e in ro.events] == ["start", "window", "window", "window"]


async def test_a_candidate_that_is_not_loaded_loads_in_the_background_then_the_first_step_begins():
    repo = FakeRepository("m", "1")
    mgr, clock = _manager(repo)
    desc = await mgr.start("m", {"candidate": "2", "source": "/models/m-v2", "window_s": WINDOW_S, "steps": [10, 100]})
    assert desc["status"] == "loading" and desc["phase"] == "loading" and desc["weights"] == {"1": 100.0}  # returned at once
    assert repo.routers["m"].policy.describe() == {"policy": "single", "version": "1"}  # traffic did not move
    ro = mgr.get("m")
    await ro.check()  # nothing to judge while it loads
    with pytest.raises(RolloutConflictError, match="still loading"):
        await mgr.promote("m")
    with pytest.raises(RolloutConflictError, match="only a running one can be paused"):
        await mgr.pause("m")
    clock.now += 30  # the load takes a while
    repo.release.set()
    await wait_for(lambda: ro.status != "loading", LOAD_TIMEOUT_S, "the candidate to load")
    _stop_watching(ro)
    assert repo.loads == [{"name": "m", "source": "/models/m-v2", "version": "2"}]  # no runtime given: its manifest's
    assert ro.status == "running" and ro.state["weights"] == {"2": 10.0, "1": 90.0}
    loaded = ro.events[-1]
    assert loaded["action"] == "loaded" and loaded["runtime"] == "onnxruntime" and loaded["weights"] == {"2": 10.0, "1": 90.0}
    assert repo.routers["m"].policy.describe()["weights"] == {"2": 10.0, "1": 90.0}
    assert ro.window_start == 1030.0  # the first window starts when the candidate serves, not when it was asked for


async def test_a_candidate_that_fails_to_load_ends_the_rollout_with_the_reason_and_traffic_untouched():
    repo = FakeRepository("m", "1")
    mgr, _clock = _manager(repo)
    await mgr.start("m", {"candidate": "2", "source": "/models/m-v2", "runtime": "openvino", "window_s": WINDOW_S})
    repo.fail = ConfigError("Use --runtime onnxruntime for ONNX files.")
    repo.release.set()
    ro = mgr.get("m")
    await wait_for(lambda: ro.status != "loading", LOAD_TIMEOUT_S, "the load to fail")
    assert repo.loads[0]["runtime"] == "openvino"
    assert ro.status == "failed" and ro.state["reason"] == (
        "version 2 could not be loaded from /models/m-v2: Use --runtime onnxruntime for ONNX files."
    )
    assert [e["action"] for e in ro.events] == ["start", "abort"]
    assert repo.routers["m"].policy.describe() == {"policy": "single", "version": "1"}
    with pytest.raises(ConfigError, match="nowhere to load it from"):
        await mgr.start("m", {"candidate": "3", "window_s": WINDOW_S})  # not served from the registry, no source


async def test_aborting_while_the_candidate_loads_unloads_it_once_it_is_ready():
    repo = FakeRepository("m", "1")
    mgr, _clock = _manager(repo)
    await mgr.start("m", {"candidate": "2", "source": "/models/m-v2", "window_s": WINDOW_S})
    ro = mgr.get("m")
    await wait_for(lambda: bool(repo.loads), LOAD_TIMEOUT_S, "the load to begin")
    desc = await mgr.abort("m", "changed my mind")
    assert desc["status"] == "aborted" and desc["reason"] == "changed my mind"
    repo.release.set()
    await asyncio.wait_for(ro.task, LOAD_TIMEOUT_S)
    assert repo.unloaded == ["2"] and set(repo.routers["m"].versions) == {"1"}
    assert repo.routers["m"].policy.describe() == {"policy": "single", "version": "1"}
    assert [e["action"] for e in ro.events] == ["start", "abort"]


# -- the verdict of one window, and the phases of each strategy -------------------------------
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
