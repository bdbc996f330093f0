"""Deployments and rollout decisions in the registry (the ``deployments`` and ``rollout_events`` tables).

A deployment is a served name: the registry model it serves, the version in production there,
its traffic policy (a :meth:`TrafficPolicy.describe` dict) and the rollout controller's state
(step, weights, thresholds, status). Every decision of a rollout is one ``rollout_events`` row
with the numbers behind it. A state change and the event that explains it are written in one
transaction, so a server killed at any instant finds both or neither when it restarts.

    with Registry() as reg:
        reg.rollouts.save("minilm", model="minilm", version=1, traffic_policy={...}, rollout_state={...},
                          event={"action": "start", ...})
        reg.rollouts.get("minilm")           # {"name", "model", "version", "traffic_policy", "rollout_state", ...}
        reg.rollouts.events("minilm")        # oldest first: {"id", "at", "decision"}
        reg.rollouts.rollback_target("minilm")   # (3, 2): production now, and what `rollback` would restore

A rollout controller's writes are fenced: ``save(..., lease=(owner, seq), expect_seq=n)`` writes
only while ``owner`` still holds the deployment's lease at ``seq``
(:mod:`modelpress.registry.leases`) and the recorded state's ``seq`` is still ``n``, checked in
the same transaction; ``promote=(ref, who, why)`` puts that version in production in it too, so
a promotion and the decision that made it are recorded together or not at all.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from sqlalchemy import select

from modelpress.errors import ConfigError, RolloutConflictError, RolloutNotFoundError
from modelpress.registry import queries, stages
from modelpress.registry.db import DeploymentRow, ModelRow, RolloutEventRow, VersionRow
from modelpress.registry.leases import check_held
from modelpress.registry.names import Ref, parse_ref, validate_name
from modelpress.registry.records import iso

T = TypeVar("T")


class StaleRolloutStateError(RolloutConflictError):
    """The recorded rollout state moved on (another server decided since); nothing was written. HTTP 409."""


class Sessions(Protocol):
    """What this module needs of a :class:`~modelpress.registry.api.Registry`: a read and a write transaction
    (a protocol, so that the registry, which offers ``reg.rollouts``, and this module do not import each other)."""

    def _read(self, fn: Callable[[Any], T]) -> T: ...

    def _write(self, fn: Callable[[Any], T]) -> T: ...


def _deployment_json(s: Any, row: DeploymentRow) -> dict[str, Any]:
    model = s.get(ModelRow, row.model_id)
    version = s.get(VersionRow, row.version_id) if row.version_id is not None else None
    return {
        "name": row.name,
        "model": model.name if model is not None else None,
        "version": version.version if version is not None else None,
        "traffic_policy": dict(row.traffic_policy or {}),
        "rollout_state": dict(row.rollout_state or {}),
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


def _event_json(row: RolloutEventRow) -> dict[str, Any]:
    return {"id": row.id, "at": iso(row.at), "decision": dict(row.decision or {})}


def _check_json(value: Any, what: str) -> dict[str, Any]:
    import json

    if not isinstance(value, dict):
        raise ConfigError(
            f"The {what} must be a JSON object (a dict), not {type(value).__name__}.", hint='Example: {"policy": "single", "version": "1"}'
        )
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"The {what} is not plain JSON ({exc}).", hint="Use strings, finite numbers, lists and dicts only (NaN is not JSON)."
        ) from None
    return value


class Rollouts:
    """The deployment and rollout-event API of one :class:`Registry` (``reg.rollouts``)."""

    def __init__(self, registry: Sessions) -> None:
        self.reg = registry

    def _row(self, s: Any, name: str, *, lock: bool = False) -> DeploymentRow | None:
        q = select(DeploymentRow).where(DeploymentRow.name == name)
        return s.scalar(q.with_for_update() if lock else q)

    def save(
        self,
        name: str,
        *,
        model: str,
        version: int | None = None,
        traffic_policy: dict[str, Any] | None = None,
        rollout_state: dict[str, Any] | None = None,
        event: dict[str, Any] | None = None,
        lease: tuple[str, int] | None = None,
        expect_seq: int | None = None,
        promote: tuple[str, str, str] | None = None,
    ) -> dict[str, Any]:
        """Create or update deployment ``name`` (serving registry model ``model``) and append ``event``, in one transaction.

        ``version``: the registry version it counts as deployed (e.g. production); None leaves
        it as it was. A policy or state of None leaves that column as it was. ``lease``:
        ``(owner, seq)`` that must still hold the deployment's lease (else
        :class:`~modelpress.registry.leases.LeaseLostError`); ``expect_seq``: the ``seq`` the
        recorded rollout state must still have (else :class:`StaleRolloutStateError`);
        ``promote``: ``(ref, who, why)``, a version to put in production in the same transaction.
        """
        name, model = validate_name(name), validate_name(model)
        if traffic_policy is not None:
            _check_json(traffic_policy, "traffic policy")
        if rollout_state is not None:
            _check_json(rollout_state, "rollout state")
        if event is not None:
            _check_json(event, "rollout event")

        def run(s: Any) -> dict[str, Any]:
            if lease is not None:
                check_held(s, name, lease[0], int(lease[1]))
            model_row = queries.get_model(s, model)
            version_id = None
            if version is not None:
                version_id = queries.resolve(s, Ref(model, version=int(version))).id
            row = self._row(s, name, lock=True)
            if expect_seq is not None:
                recorded = (row.rollout_state or {}).get("seq") if row is not None else None
                if recorded != expect_seq:
                    raise StaleRolloutStateError(
                        f"The rollout state of '{name}' in the registry is at decision {recorded}, not {expect_seq}: "
                        "another server decided since, so this decision was not recorded.",
                        hint=f"Read the current state: modelpress rollout status {name}",
                    )
            if promote is not None:
                stages.set_stage(s, queries.resolve(s, parse_ref(promote[0]), lock=True), "production", promote[1], promote[2], "promote")
            if row is None:
                row = DeploymentRow(
                    name=name,
                    model_id=model_row.id,
                    version_id=version_id,
                    traffic_policy=traffic_policy or {},
                    rollout_state=rollout_state or {},
                )
                s.add(row)
            else:
                row.model_id = model_row.id
                if version is not None:
                    row.version_id = version_id
                if traffic_policy is not None:
                    row.traffic_policy = dict(traffic_policy)
                if rollout_state is not None:
                    row.rollout_state = dict(rollout_state)
            s.flush()
            if event is not None:
                s.add(RolloutEventRow(deployment_id=row.id, decision=dict(event)))
                s.flush()
            return _deployment_json(s, row)

        return self.reg._write(run)

    def record(self, name: str, decision: dict[str, Any]) -> dict[str, Any]:
        """Append one decision to deployment ``name``'s events; returns the event."""
        _check_json(decision, "rollout event")
        name = validate_name(name)

        def run(s: Any) -> dict[str, Any]:
            row = self._row(s, name)
            if row is None:
                raise self._missing(s, name)
            ev = RolloutEventRow(deployment_id=row.id, decision=dict(decision))
            s.add(ev)
            s.flush()
            return _event_json(ev)

        return self.reg._write(run)

    def get(self, name: str) -> dict[str, Any] | None:
        """Deployment ``name`` (model, version, traffic_policy, rollout_state, times), or None."""
        name = validate_name(name)

        def run(s: Any) -> dict[str, Any] | None:
            row = self._row(s, name)
            return _deployment_json(s, row) if row is not None else None

        return self.reg._read(run)

    def list(self) -> list[dict[str, Any]]:
        """Every deployment, by name."""
        return self.reg._read(lambda s: [_deployment_json(s, r) for r in s.scalars(select(DeploymentRow).order_by(DeploymentRow.name))])

    def events(self, name: str, limit: int | None = None) -> builtins.list[dict[str, Any]]:  # `list` is the method above
        """The decisions of deployment ``name``, oldest first (the last ``limit`` when given)."""
        name = validate_name(name)

        def run(s: Any) -> builtins.list[dict[str, Any]]:
            row = self._row(s, name)
            if row is None:
                raise self._missing(s, name)
            q = select(RolloutEventRow).where(RolloutEventRow.deployment_id == row.id).order_by(RolloutEventRow.id.desc())
            if limit is not None:
                q = q.limit(int(limit))
            return [_event_json(e) for e in reversed(s.scalars(q).all())]

        return self.reg._read(run)

    def delete(self, name: str) -> bool:
        """Remove deployment ``name`` and its events; False when there was none."""
        name = validate_name(name)

        def run(s: Any) -> bool:
            row = self._row(s, name, lock=True)
            if row is None:
                return False
            s.delete(row)
            return True

        return self.reg._write(run)

    def rollback_target(self, model: str) -> tuple[int, int]:
        """(production version now, the version ``Registry.rollback(model)`` would put back); raises when there is none."""
        model = validate_name(model)

        def run(s: Any) -> tuple[int, int]:
            current, target = stages.rollback_target(s, queries.get_model(s, model))
            return current.version, target.version

        return self.reg._read(run)

    def _missing(self, s: Any, name: str) -> RolloutNotFoundError:
        known = s.scalars(select(DeploymentRow.name).order_by(DeploymentRow.name).limit(10)).all()
        hint = (
            f"Deployments: {', '.join(known)}."
            if known
            else "No deployment is recorded yet; `modelpress rollout start NAME ...` creates one."
        )
        return RolloutNotFoundError(f"There is no deployment named '{name}' in the registry.", hint=hint)
