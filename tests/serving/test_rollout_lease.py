"""One controller per model across servers, and decisions the registry did not record, on a fake clock.

Two RolloutManagers stand in for two servers (each with its own stand-in repository, as in
test_rollout_windows.py) on one SQLite registry: the one holding the lease decides, the other
follows the recorded split and takes over when the lease expires. The real two-process run on
PostgreSQL is test_rollout_lease_process.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from modelpress.cli.rollout import print_status
from modelpress.errors import RegistryError, RolloutConflictError
from modelpress.registry.leases import LeaseLostError
from modelpress.registry.rollouts import Rollouts
from modelpress.rollout.controller import RolloutManager
from modelpress.rollout.observations import Observations

from .test_rollout_windows import FakeClock, FakeRepository

pytestmark = pytest.mark.anyio
LEASE_S = 0.5  # short, so that a "dead" controller's lease runs out within the test
WINDOW_S = 60.0
SPEC = {"candidate": "2", "steps": [20, 50, 100], "window_s": WINDOW_S, "min_requests": 10, "max_p99_ratio": None}


@pytest.fixture
def registry_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A SQLite registry with m:1 in production and m:2 (tiny stand-in files; nothing here loads them)."""
    from modelpress.artifacts import Artifact, Manifest, Signature, TensorSpec
    from modelpress.registry.api import Registry

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))  # the journal of unrecorded decisions lives here
    sig = Signature(
        inputs=[TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])],
        outputs=[TensorSpec(name="out", dtype="float32", shape=["batch", 8])],
    )
    url = str(tmp_path / "reg.db")
    with Registry(url) as reg:
        for i, stage in ((1, "production"), (2, "candidate")):
            manifest = Manifest(name="m", task="embedding", format="onnx", model_file="model.onnx", signature=sig)
            art = Artifact.write(tmp_path / f"a{i}", manifest, lambda d, i=i: (d / "model.onnx").write_bytes(b"graph %d" % i) and None)
            reg.register(art, "m", stage=stage)
    return url


def _server(url: str, owner: str, clock: FakeClock) -> tuple[RolloutManager, FakeRepository]:
    repo = FakeRepository()
    for label, lv in repo.routers["m"].versions.items():
        lv.registry_ref = f"m:{label}"
    return RolloutManager(repo, Observations(clock=clock), url, clock=clock, owner=owner, lease_s=LEASE_S), repo


def _requests(mgr: RolloutManager, version: str, n: int, *, errors: int = 0) -> None:
    for i in range(n):
        mgr.observations.answered("m", version, 0.010, ok=i >= errors)


async def _resume_by_hand(mgr: RolloutManager) -> list[str]:
    """resume_all, without the background sync: the test calls sync_once itself, at the moments it picks."""
    out = await mgr.resume_all()
    if mgr._sync_task is not None:
        mgr._sync_task.cancel()
    return out


def _stop_watching(mgr: RolloutManager) -> None:
    ro = mgr.rollouts.get("m")
    if ro is not None and ro.task is not None:
        ro.task.cancel()


def _recorded(url: str) -> tuple[dict[str, Any], list[str]]:
    from modelpress.registry.api import Registry

    with Registry(url) as reg:
        return reg.rollouts.get("m")["rollout_state"], [e["decision"]["action"] for e in reg.rollouts.events("m")]


async def test_the_lease_holder_decides_the_other_server_follows_and_takes_over_when_the_lease_expires(registry_file, capsys):
    clock = FakeClock()
    a, repo_a = _server(registry_file, "server-a", clock)
    b, repo_b = _server(registry_file, "server-b", clock)
    try:
        await a.start("m", SPEC)
        _stop_watching(a)
        assert await _resume_by_hand(b) == []  # a drives it: b follows
        assert repo_b.routers["m"].policy.describe() == repo_a.routers["m"].policy.describe()
        follower = b.get("m")
        assert follower.driving is False and b.status("m")["controller"] == "server-a" and a.status("m")["controller"] == "server-a"
        for act in (b.pause("m"), b.abort("m"), b.start("m", SPEC)):
            with pytest.raises(RolloutConflictError, match="server-a"):
                await act
        await follower.check()  # a follower never judges a window
        print_status(b.status("m"))
        assert "driven by the server server-a; this one follows the registry" in capsys.readouterr().out
        assert len(_recorded(registry_file)[1]) == 1

        _requests(a, "1", 40)
        _requests(a, "2", 10)
        clock.now += WINDOW_S
        await a.get("m").check()
        assert a.get("m").state["step"] == 1
        await b.sync_once()  # the follower's routing follows the recorded step
        assert repo_b.routers["m"].policy.describe()["weights"] == {"2": 50.0, "1": 50.0} and b.get("m").state["step"] == 1

        await a.sync_once()  # a renews while alive: b cannot take over
        await b.sync_once()
        assert b.get("m").driving is False

        time.sleep(LEASE_S * 1.5)  # a goes silent (no renewal): its lease runs out
        assert await b.sync_once() == ["m"]
        _stop_watching(b)
        taken = b.get("m")
        assert taken.driving and taken.state["step"] == 1 and b.status("m")["controller"] == "server-b"
        state, actions = _recorded(registry_file)
        assert actions == ["start", "advance", "takeover"] and state["step"] == 1

        # a wakes up and judges its window: its decision is refused, and it follows from now on
        _requests(a, "2", 10)
        clock.now += WINDOW_S
        with pytest.raises(LeaseLostError, match="now server-b"):
            await a.get("m").check()  # it would advance: refused
        assert a.get("m").driving is False and a.get("m").state["step"] == 1
        assert _recorded(registry_file)[1] == ["start", "advance", "takeover"]
        with pytest.raises(LeaseLostError):
            await a.persist(a.get("m"), {"action": "hold", "at": "now"})

        _requests(b, "1", 40)
        _requests(b, "2", 20)
        clock.now += WINDOW_S
        await taken.check()
        clock.now += WINDOW_S
        _requests(b, "2", 20)
        await taken.check()
        assert taken.status == "succeeded" and _recorded(registry_file)[1][-2:] == ["advance", "promote"]
        await a.sync_once()  # the former controller follows the promotion
        assert repo_a.routers["m"].policy.describe() == {"policy": "single", "version": "2"}
        assert set(repo_a.routers["m"].versions) == set(repo_b.routers["m"].versions) == {"1", "2"}  # 1 stands by on both
        with pytest.raises(RolloutConflictError, match="already succeeded"):
            await a.abort("m")

        out = await a.rollback("m", "p99 doubled")  # by hand, on either server: it takes the (free) lease for the change
        assert out["serving"] == "1" and out["production"] == "m:1"
        await b.sync_once()  # the other server follows the recorded change
        assert repo_b.routers["m"].policy.describe() == {"policy": "single", "version": "1"} and "2" not in repo_b.routers["m"].versions
        assert b.get("m").status == "rolled_back" and _recorded(registry_file)[1][-1] == "rollback"
    finally:
        await a.close()
        await b.close()


async def test_a_sync_that_read_the_registry_before_the_promotion_was_recorded_does_not_resume_the_rollout(registry_file, monkeypatch):
    """The background sync reads the deployments in a worker thread; the rollout may end (promotion recorded) before it
    goes on with what it read. That stale "running" must not resume the finished rollout (it did: the resumed copy was
    refused by the registry's seq fence, and the server then reported the rollout as driven by some other server)."""
    clock = FakeClock()
    a, repo = _server(registry_file, "server-a", clock)
    try:
        await a.start("m", SPEC)
        _stop_watching(a)
        ro = a.get("m")
        before = a.registry().rollouts.list()  # what a sync read while the rollout still ran
        assert before[0]["rollout_state"]["status"] == "running"
        for _ in range(3):
            _requests(a, "1", 40)
            _requests(a, "2", 40)
            clock.now += WINDOW_S
            await ro.check()
        assert ro.status == "succeeded" and _recorded(registry_file)[1][-1] == "promote"
        monkeypatch.setattr(Rollouts, "list", lambda self: before)  # the stale read, handed to the sync after the promotion
        assert await a.sync_once() == []
        assert a.get("m") is ro and ro.status == "succeeded" and ro.driving
        assert _recorded(registry_file)[1][-1] == "promote"  # nothing resumed, nothing refused
        assert repo.routers["m"].policy.describe() == {"policy": "single", "version": "2"}
    finally:
        await a.close()


async def test_an_unrecorded_rollback_keeps_the_baseline_is_retried_and_a_restart_never_puts_the_split_back(
    registry_file, monkeypatch, capsys
):
    real_save = Rollouts.save
    down = {"on": True}

    def flaky_save(self: Rollouts, name: str, **kw: Any) -> Any:
        if down["on"] and (kw.get("event") or {}).get("action") == "rollback":
            raise RegistryError("The registry database failed: connection refused (injected)")
        return real_save(self, name, **kw)

    monkeypatch.setattr(Rollouts, "save", flaky_save)
    clock = FakeClock()
    first, repo = _server(registry_file, "server-a", clock)
    await first.start("m", SPEC)
    _stop_watching(first)
    _requests(first, "1", 80)
    _requests(first, "2", 20, errors=6)  # a clear breach, mid-window
    clock.now += 1
    await first.get("m").check()
    ro = first.get("m")
    assert ro.status == "rolled_back" and ro.state["recorded"] is False and first.status("m")["status"] == "rolled_back"
    assert repo.routers["m"].policy.describe() == {"policy": "single", "version": "1"}  # the safe state, at once
    assert _recorded(registry_file)[0]["status"] == "running"  # the registry still says the split runs
    journal = list((Path(registry_file).parent / "home" / "rollouts").glob("pending-*"))
    assert len(journal) == 1
    with pytest.raises(RolloutConflictError, match="not recorded"):
        await first.start("m", SPEC)
    print_status(first.status("m"))
    assert "not recorded in the registry yet" in capsys.readouterr().out
    await first.close()  # the server stops (or dies) before the registry came back

    second, repo2 = _server(registry_file, "server-a", clock)  # restarted, same id
    try:
        await _resume_by_hand(second)
        assert repo2.routers["m"].policy.describe() == {"policy": "single", "version": "1"}  # not the breached 20/80 split
        assert second.get("m").status == "rolled_back" and "m" in second.pending
        down["on"] = False  # the registry is back: the retry lands
        deadline = time.monotonic() + 10
        while "m" in second.pending:
            assert time.monotonic() < deadline, "the rollback was never recorded"
            await _sleep(0.05)
        state, actions = _recorded(registry_file)
        assert state["status"] == "rolled_back" and actions == ["start", "rollback"] and second.get("m").state["recorded"] is True
        assert not list(journal[0].parent.glob("pending-*"))
        await second.sync_once()
        assert repo2.routers["m"].policy.describe() == {"policy": "single", "version": "1"}
    finally:
        await second.close()


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
