"""The registry's deployment and rollout-event API (reg.rollouts), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from modelpress.errors import ConfigError, RegistryConflictError, RegistryNotFoundError, RolloutNotFoundError


def _two_versions(registry, make_artifact):
    registry.register(make_artifact("a"), "m", stage="production")
    registry.register(make_artifact("b"), "m")


def test_save_get_and_events_round_trip(registry, make_artifact):
    _two_versions(registry, make_artifact)
    ro = registry.rollouts
    assert ro.get("m") is None and ro.list() == []
    policy = {"policy": "split", "weights": {"2": 5.0, "1": 95.0}, "sticky": True}
    state = {"status": "running", "step": 0, "weights": {"2": 5.0, "1": 95.0}}
    dep = ro.save("m", model="m", version=1, traffic_policy=policy, rollout_state=state, event={"action": "start", "seq": 1})
    assert dep["name"] == "m" and dep["model"] == "m" and dep["version"] == 1
    assert dep["traffic_policy"] == policy and dep["rollout_state"] == state
    # an update keeps what is not given, and appends its event in the same transaction
    state2 = {**state, "step": 1, "weights": {"2": 25.0, "1": 75.0}}
    ro.save("m", model="m", rollout_state=state2, event={"action": "advance", "seq": 2, "numbers": {"p99_ratio": 1.01}})
    dep = ro.get("m")
    assert dep["version"] == 1 and dep["traffic_policy"] == policy and dep["rollout_state"]["step"] == 1
    ro.record("m", {"action": "hold", "seq": 3})
    events = ro.events("m")
    assert [e["decision"]["action"] for e in events] == ["start", "advance", "hold"]
    assert events[1]["decision"]["numbers"] == {"p99_ratio": 1.01} and events[0]["at"] is not None
    assert [e["decision"]["seq"] for e in ro.events("m", limit=2)] == [2, 3]  # the latest two, oldest first
    ro.save("m", model="m", version=2)
    assert ro.get("m")["version"] == 2
    assert [d["name"] for d in ro.list()] == ["m"]


def test_deployment_pins_its_version_against_delete(registry, make_artifact):
    _two_versions(registry, make_artifact)
    registry.rollouts.save("svc", model="m", version=2, rollout_state={"status": "running"})
    with pytest.raises(RegistryConflictError, match="deployed as svc"):
        registry.delete("m:2")
    assert registry.rollouts.delete("svc") is True and registry.rollouts.delete("svc") is False
    registry.delete("m:2")


def test_errors_are_typed_and_say_what_to_do(registry, make_artifact):
    _two_versions(registry, make_artifact)
    ro = registry.rollouts
    with pytest.raises(RolloutNotFoundError, match="no deployment named 'nope'"):
        ro.events("nope")
    with pytest.raises(RolloutNotFoundError, match="no deployment"):
        ro.record("nope", {"action": "x"})
    with pytest.raises(RegistryNotFoundError, match="no model named 'ghost'"):
        ro.save("ghost", model="ghost")
    with pytest.raises(RegistryNotFoundError, match="no version 9"):
        ro.save("m", model="m", version=9)
    with pytest.raises(ConfigError, match="not plain JSON"):
        ro.save("m", model="m", rollout_state={"p99": float("nan")})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        ro.save("m", model="m", traffic_policy=["single"])  # type: ignore[arg-type]
    assert ro.get("m") is None  # nothing half-written


def test_rollback_target_matches_what_rollback_does(registry, make_artifact):
    _two_versions(registry, make_artifact)
    with pytest.raises(RegistryConflictError, match="nothing to roll back to"):
        registry.rollouts.rollback_target("m")
    registry.promote("m:2", "production")
    assert registry.rollouts.rollback_target("m") == (2, 1)
    assert registry.rollback("m").version == 1  # the same answer the real rollback gives
