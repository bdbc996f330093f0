"""Stages: moving a version between candidate, staging, production and archived, and rolling back.

One production version per model at any instant: promoting a version to production archives the
one that was there in the same transaction (and a partial unique index on ``versions`` enforces
it whatever the code does). Every change is a ``stage_events`` row: from, to, action, who, when, why.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from modelpress.errors import RegistryConflictError
from modelpress.registry.db import ModelRow, StageEventRow, VersionRow


def set_stage(s: Any, row: VersionRow, stage: str, who: str | None, why: str | None, action: str) -> None:
    """Move ``row`` to ``stage`` (a no-op when it is there); the model row must be locked by the caller."""
    if row.stage == stage:
        return
    if stage == "production":
        current = s.scalar(
            select(VersionRow).where(VersionRow.model_id == row.model_id, VersionRow.stage == "production").with_for_update()
        )
        if current is not None and current.id != row.id:
            current.stage = "archived"
            s.add(StageEventRow(version_id=current.id, from_stage="production", to_stage="archived", action=action, who=who, why=why))
            s.flush()  # the old production row changes first: one production version at any instant
    s.add(StageEventRow(version_id=row.id, from_stage=row.stage, to_stage=stage, action=action, who=who, why=why))
    row.stage = stage
    s.flush()


def production_history(s: Any, model: ModelRow) -> list[int]:
    """The stack of version ids that production went through, the current one last.

    Built from the stage events into production, in order: a promote pushes its version (moving
    it to the top if it was there before); a rollback pops back down to the version it restored.
    So rolling back twice goes two steps back, and a rollback is never itself rolled back to.
    """
    events = s.execute(
        select(StageEventRow.version_id, StageEventRow.action)
        .join(VersionRow, VersionRow.id == StageEventRow.version_id)
        .where(VersionRow.model_id == model.id, StageEventRow.to_stage == "production")
        .order_by(StageEventRow.id)
    ).all()
    stack: list[int] = []
    for version_id, action in events:
        if action == "rollback":
            while stack and stack[-1] != version_id:
                stack.pop()
            if not stack:
                stack.append(version_id)
        else:
            if version_id in stack:
                stack.remove(version_id)
            stack.append(version_id)
    return stack


def rollback_target(s: Any, model: ModelRow) -> tuple[VersionRow, VersionRow]:
    """(current production version, the version to put back) of a locked model row."""
    name = model.name
    current = s.scalar(select(VersionRow).where(VersionRow.model_id == model.id, VersionRow.stage == "production"))
    if current is None:
        raise RegistryConflictError(
            f"'{name}' has no version in production to roll back from.",
            hint=f"Promote one: modelpress registry promote {name}:VERSION --stage production",
        )
    earlier = [v for v in production_history(s, model) if v != current.id]
    if not earlier:
        raise RegistryConflictError(
            f"{name}:{current.version} is the only version of '{name}' that has been in production; there is nothing to roll back to.",
            hint=f"Promote a specific version instead: modelpress registry promote {name}:VERSION --stage production",
        )
    return current, s.get(VersionRow, earlier[-1])
