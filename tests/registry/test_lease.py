"""Rollout leases (reg.leases): compare-and-set on the sequence number, expiry, fenced writes (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

import pytest

from modelpress.errors import ConfigError
from modelpress.registry.leases import LeaseLostError
from modelpress.registry.rollouts import StaleRolloutStateError

T0 = 1_000_000.0  # a fixed clock: expiry is decided by the `now` each call passes
TTL_S = 10.0


def test_one_holder_at_a_time_and_the_sequence_number_fences_writes(registry, make_artifact):
    leases = registry.leases
    assert leases.get("m") is None
    a = leases.acquire("m", "server-a", TTL_S, now=T0)
    assert a is not None and (a.owner, a.seq, a.expires_at) == ("server-a", 1, T0 + TTL_S)
    assert leases.acquire("m", "server-b", TTL_S, now=T0 + 5) is None  # held and not expired
    a2 = leases.renew(a, TTL_S, now=T0 + 5)
    assert a2 is not None and a2.seq == a.seq and a2.expires_at == T0 + 15  # renewing keeps the fencing token
    assert leases.acquire("m", "server-b", TTL_S, now=T0 + 14) is None
    b = leases.acquire("m", "server-b", TTL_S, now=T0 + 16)  # expired: B takes over with a new token
    assert b is not None and b.seq == a.seq + 1 and leases.get("m").owner == "server-b"
    assert leases.renew(a2, TTL_S, now=T0 + 16) is None and leases.release(a2) is False  # A lost it and cannot touch it

    registry.register(make_artifact("a"), "m", stage="production")
    registry.register(make_artifact("b"), "m")
    ro = registry.rollouts
    ro.save("m", model="m", rollout_state={"status": "running", "seq": 1}, event={"action": "start"}, lease=("server-b", b.seq))
    with pytest.raises(LeaseLostError, match="no longer held by server-a"):
        ro.save("m", model="m", rollout_state={"status": "rolled_back", "seq": 2}, event={"action": "rollback"}, lease=("server-a", a.seq))
    with pytest.raises(StaleRolloutStateError, match="another server decided since"):
        ro.save("m", model="m", rollout_state={"status": "running", "seq": 2}, expect_seq=5, lease=("server-b", b.seq))
    with pytest.raises(LeaseLostError):  # a promotion under a lost lease changes no stage either
        ro.save("m", model="m", version=2, rollout_state={"status": "succeeded"}, lease=("server-a", a.seq), promote=("m:2", "x", "y"))
    assert registry.get("m@production").version == 1
    assert ro.get("m")["rollout_state"] == {"status": "running", "seq": 1} and len(ro.events("m")) == 1
    dep = ro.save(
        "m",
        model="m",
        version=2,
        rollout_state={"status": "succeeded", "seq": 2},
        lease=("server-b", b.seq),
        expect_seq=1,
        promote=("m:2", "rollout", "passed"),
    )
    assert dep["version"] == 2 and registry.get("m@production").version == 2

    assert leases.release(b) is True
    c = leases.acquire("m", "server-c", TTL_S, now=T0 + 17)  # released: free at once
    assert c is not None and c.seq == b.seq + 2  # release and acquire each moved the token


def test_the_same_owner_takes_its_lease_back_with_a_new_token(registry):
    first = registry.leases.acquire("m", "host:8000", TTL_S, now=T0)
    again = registry.leases.acquire("m", "host:8000", TTL_S, now=T0 + 1)  # a restarted server with the same id
    assert again is not None and again.seq == first.seq + 1
    assert registry.leases.renew(first, TTL_S, now=T0 + 2) is None  # the earlier run of it is fenced off


def test_racing_acquirers_of_an_expired_lease_exactly_one_wins(registry):
    registry.leases.acquire("m", "old", TTL_S, now=T0)
    results: list = []
    start = threading.Barrier(6)

    def grab(i: int) -> None:
        start.wait()
        results.append(registry.leases.acquire("m", f"server-{i}", TTL_S, now=T0 + TTL_S + 1))

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    won = [r for r in results if r is not None]
    assert len(results) == 6 and len(won) == 1 and won[0].seq == 2
    assert registry.leases.get("m").owner == won[0].owner


def test_bad_owner_or_time_is_a_clear_error(registry):
    with pytest.raises(ConfigError, match="lease owner"):
        registry.leases.acquire("m", "", TTL_S)
    for ttl in (0, -1, float("inf"), 10_000):
        with pytest.raises(ConfigError, match="lease time"):
            registry.leases.acquire("m", "a", ttl)
