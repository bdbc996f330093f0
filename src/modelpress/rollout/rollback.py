"""Instant rollback of live traffic: ``POST /rollouts/{model}/rollback`` and ``modelpress rollback``.

During a rollout: abort it (the baseline, still production, takes all traffic back).
Otherwise: the previous production version (from the registry's stage history) is loaded
unless it is still standing by, the registry rolls back (recorded as ``registry rollback``
records it), and traffic switches in one step; the version rolled back from drains and unloads.
The server holds the model's rollout lease meanwhile (a 409 names the server that holds it
when another one does), and records the new state under it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from modelpress.errors import ConfigError, RolloutConflictError
from modelpress.rollout.routing import SinglePolicy
from modelpress.rollout.spec import ACTIVE, now_iso


async def rollback_live(manager: Any, model: str, why: str | None = None) -> dict[str, Any]:
    """Roll ``model`` back on the server of ``manager`` (a :class:`~modelpress.rollout.controller.RolloutManager`)."""
    ro = manager.rollouts.get(model)
    if ro is not None and ro.status in ACTIVE:
        desc = await manager.abort(model, why or "rolled back by hand")
        return {"model": model, "serving": ro.baseline, "registry_changed": False, "rollout": desc}
    router = manager.router(model)
    current = router.policy.main
    lv = router.versions[current]
    if not lv.registry_ref:
        raise ConfigError(
            f"'{model}' is not served from the registry, so there is no production history to roll back along.",
            hint=f"Serve it as {model}@production, or load the version you want by hand (POST /v2/repository/models/{model}/load).",
        )
    reg_model = lv.registry_ref.split(":")[0]
    prod, target = await asyncio.to_thread(manager.registry().rollouts.rollback_target, reg_model)
    if str(prod) != current:
        raise RolloutConflictError(
            f"'{model}' serves version {current}, but the registry's production version is {prod}; "
            "a rollback would not move traffic off what it serves.",
            hint=f"Load {reg_model}@production first, or use `modelpress registry rollback {reg_model}` to change the registry alone.",
        )
    label = str(target)
    lease = await manager.claim(model)
    try:
        return await _switch(manager, model, router, ro, current, label, reg_model, target, lease, why)
    finally:
        await manager._release(model)


async def _switch(
    manager: Any, model: str, router: Any, ro: Any, current: str, label: str, reg_model: str, target: int, lease: Any, why: str | None
) -> dict[str, Any]:
    await manager.ensure_loaded(model, label, f"{reg_model}:{target}")
    mv = await asyncio.to_thread(manager.registry().rollback, reg_model, None, why or f"modelpress rollback of {model} (live traffic)")
    router.set_policy(SinglePolicy(label))
    with_state = {
        "model": model,
        "status": "rolled_back",
        "baseline": label,
        "candidate": current,
        "registry_model": reg_model,
        "policy": router.policy.describe(),
        "weights": {label: 100.0},
        "finished_at": now_iso(),
        "reason": why or "rolled back by hand",
    }
    event = {
        "action": "rollback",
        "at": now_iso(),
        "from": current,
        "to": label,
        "registry": f"{mv.ref} back in production",
        "reasons": [why or "rolled back by hand"],
    }
    await asyncio.to_thread(
        manager.registry().rollouts.save,
        model,
        model=reg_model,
        version=mv.version,
        traffic_policy=router.policy.describe(),
        rollout_state=with_state,
        event=event,
        lease=(lease.owner, lease.seq),
    )
    if ro is not None:  # the finished rollout shown for this model: it was rolled back after all
        ro.state.update(
            status="rolled_back",
            reason=with_state["reason"],
            finished_at=with_state["finished_at"],
            weights={label: 100.0},
            policy=router.policy.describe(),
        )
        ro.events.append(event)
    await manager.unload(model, current)
    return {"model": model, "serving": label, "from": current, "registry_changed": True, "production": mv.ref}


__all__ = ["rollback_live"]
