"""The rollout controller: canary, shadow-then-canary, blue-green and A/B, driven by live numbers.

    manager = server.rollouts            # a RolloutServer's; see modelpress.rollout.extension
    await manager.start("minilm", RolloutSpec(candidate="2", strategy="canary", steps=[5, 25, 50, 100],
                                              window_s=60, max_error_rate=0.01, max_p99_ratio=1.2))

The strategies and their phases are in :mod:`modelpress.rollout.spec`; one rollout's window
loop is :class:`~modelpress.rollout.watch.Rollout`. A candidate that is not loaded yet is loaded
in the background: ``start`` returns at once with the rollout ``loading`` (traffic unchanged),
and once the candidate is loaded and warmed up (on the runtime its manifest records, unless the
spec names one) the first phase begins; a load that fails ends the rollout ``failed``, with the
reason. Passing the last step promotes the candidate to production in the registry.
``pause``, ``resume``, ``abort`` and ``promote`` act by hand. Every decision, with its numbers,
is a registry event, and the state (phase, step, weights) is saved with it in one transaction,
so a server restarted mid-rollout (:meth:`RolloutManager.resume_all`, called when the server
starts) resumes at the same step with the same weights. A model not served from the registry
is rolled out in memory only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from modelpress.errors import ConfigError, RolloutConflictError, RolloutNotFoundError
from modelpress.rollout.analysis import compare
from modelpress.rollout.observations import Observations
from modelpress.rollout.routing import SinglePolicy, policy_from_json
from modelpress.rollout.spec import ACTIVE, RolloutSpec, now_iso, parse_spec, phases_of
from modelpress.rollout.watch import Rollout

log = logging.getLogger("modelpress.rollout")

ROLLOUT_USER = "modelpress-rollout"


class RolloutManager:
    """Every rollout of one server; all methods run on the server's event loop.

    ``repository``: the server's :class:`~modelpress.serving.repository.ModelRepository`;
    ``observations``: what each version did; ``registry``: the registry URL or file (None: the
    default one); ``clock``: the time windows are measured on (default :func:`time.monotonic`).
    """

    MAX_EVENTS_IN_MEMORY = 200

    def __init__(
        self, repository: Any, observations: Observations, registry: str | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.repository = repository
        self.observations = observations
        self.registry_url = registry
        self.clock = clock
        self.rollouts: dict[str, Rollout] = {}
        self._registry: Any = None

    # the registry -------------------------------------------------------------------------------
    def registry(self) -> Any:
        if self._registry is None:
            from modelpress.registry.api import Registry

            self._registry = Registry(self.registry_url)
        return self._registry

    def store_for(self, ro: Rollout) -> Any:
        return self.registry().rollouts if ro.state.get("registry_model") else None

    async def persist(
        self, ro: Rollout, event: dict[str, Any] | None, *, version: int | None = None, updates: dict[str, Any] | None = None
    ) -> None:
        """Write the state (with ``updates``) and ``event`` to the registry in one transaction; then make them current here."""
        state = {**ro.state, **(updates or {}), "updated_at": now_iso()}
        if event is not None:
            phases = phases_of(ro.spec)
            state["seq"] = state.get("seq", 0) + 1
            event = {
                **event,
                "seq": state["seq"],
                "step": state["step"],
                "phase": "loading" if state["status"] == "loading" else phases[min(state["step"], len(phases) - 1)]["phase"],
                "weights": state.get("weights"),
                "baseline": state["baseline"],
                "candidate": state["candidate"],
            }
            state["last_decision"] = {k: event[k] for k in ("action", "seq", "at", "reasons") if k in event}
        store = self.store_for(ro)
        if store is not None:
            await asyncio.to_thread(
                store.save,
                ro.model,
                model=state["registry_model"],
                version=version,
                traffic_policy=state.get("policy"),
                rollout_state={**state, "spec": ro.spec.model_dump()},
                event=event,
            )
        ro.state.clear()
        ro.state.update(state)
        if event is not None:
            ro.events.append(event)
            del ro.events[: -self.MAX_EVENTS_IN_MEMORY]

    # lookups --------------------------------------------------------------------------------------
    def get(self, model: str) -> Rollout:
        ro = self.rollouts.get(model)
        if ro is None:
            raise RolloutNotFoundError(
                f"No rollout of '{model}' on this server.", hint=f"Start one: modelpress rollout start {model} --candidate VERSION"
            )
        return ro

    def status(self, model: str) -> dict[str, Any]:
        ro = self.get(model)
        out = ro.describe()
        cand, base, shadow = ro.window_stats()
        out["window"] = {"candidate": cand.to_json(), "baseline": base.to_json(), "shadow": shadow}
        out["events"] = list(ro.events[-20:])
        return out

    def router(self, model: str) -> Any:
        router = self.repository.routers.get(model)
        if router is None or router.policy is None:
            raise RolloutNotFoundError(
                f"No model named '{model}' is served here.", hint=f"Served: {', '.join(self.repository.names()) or 'none'}."
            )
        return router

    # starting -------------------------------------------------------------------------------------
    async def start(self, model: str, spec: RolloutSpec | dict[str, Any]) -> dict[str, Any]:
        """Start a rollout of ``spec.candidate`` for served model ``model``.

        A candidate that is not loaded is loaded in the background: the rollout is ``loading``
        until it is ready, then its first phase begins.
        """
        spec = spec if isinstance(spec, RolloutSpec) else parse_spec(spec)
        current = self.rollouts.get(model)
        if current is not None and current.status in ACTIVE:
            raise RolloutConflictError(
                f"A {current.spec.strategy} rollout of '{model}' to version {current.candidate} is {current.status}.",
                hint=f"Wait for it, or stop it first: modelpress rollout abort {model}",
            )
        router = self.router(model)
        baseline = spec.baseline or router.policy.main
        if baseline not in router.versions:
            raise ConfigError(f"The baseline version '{baseline}' of '{model}' is not loaded.", hint=router.versions_hint())
        if spec.candidate == baseline:
            raise ConfigError(
                f"The candidate is the baseline itself (version {baseline}).", hint="Name another version: --candidate VERSION"
            )
        base_lv = router.versions[baseline]
        registry_model = base_lv.registry_ref.split(":")[0] if base_lv.registry_ref else None
        source = spec.source or (f"{registry_model}:{spec.candidate}" if registry_model else None)
        cand_lv = router.versions.get(spec.candidate)
        if cand_lv is None:
            self._check_source(model, spec.candidate, source)
        state = {
            "model": model,
            "status": "running" if cand_lv is not None else "loading",
            "step": 0,
            "windows": 0,
            "baseline": baseline,
            "candidate": spec.candidate,
            "registry_model": registry_model,
            "baseline_ref": base_lv.registry_ref,
            "candidate_ref": cand_lv.registry_ref if cand_lv is not None else None,
            "candidate_source": source,
            "started_at": now_iso(),
            "seq": 0,
        }
        ro = Rollout(self, model, spec, state)
        policy = ro.policy_for_step() if cand_lv is not None else router.policy  # loading: traffic stays as it is
        ro.stage(policy)
        self.rollouts[model] = ro
        try:
            await self.persist(ro, ro.event("start", spec=spec.model_dump()), version=_int_or_none(base_lv.registry_ref))
        except BaseException:
            self.rollouts.pop(model, None)
            raise
        if cand_lv is not None:
            await ro.apply(policy)
        else:
            ro.applied = policy
        ro.start_task()
        log.info("rollout of %s: %s %s -> %s %s", model, spec.strategy, baseline, spec.candidate, ro.status)
        return ro.describe()

    def _check_source(self, model: str, label: str, source: str | None) -> None:
        if source is None:
            config = f'{{"parameters": {{"config": "{{\\"source\\": \\"FOLDER\\", \\"version\\": \\"{label}\\"}}"}}}}'
            raise ConfigError(
                f"Version '{label}' of '{model}' is not loaded, and '{model}' is not served from the registry, "
                "so there is nowhere to load it from.",
                hint=f'Load it first (POST /v2/repository/models/{model}/load with {config}), or pass "source".',
            )

    async def ensure_loaded(self, model: str, label: str, source: str | None, runtime: str | None = None) -> Any:
        """The loaded version ``label`` of ``model``, loading it from ``source`` (on ``runtime``, else its manifest's) if needed."""
        router = self.repository.routers[model]
        if label in router.versions:
            return router.versions[label]
        self._check_source(model, label, source)
        cfg = self.repository.config_for(model, {"source": source, "version": label, **({"runtime": runtime} if runtime else {})})
        return await self.repository.load(cfg, make_default=False, retire_previous=False)

    # the end of a rollout -----------------------------------------------------------------------
    async def finish(
        self,
        ro: Rollout,
        status: str,
        action: str,
        reasons: list[str],
        numbers: dict[str, Any] | None = None,
        *,
        leave_traffic: bool = False,
    ) -> None:
        """Roll back / abort (traffic to the baseline first, then the record) or promote (record first, then traffic).

        ``leave_traffic``: the router is no longer the rollout's to steer (unloaded, or re-pointed by hand)
        or never was (the candidate did not load): only record.
        """
        router = None if leave_traffic else self.repository.routers.get(ro.model)
        numbers = numbers or {}
        if status == "succeeded":
            promoted = None
            if ro.spec.promote and ro.state.get("candidate_ref"):
                mv = await asyncio.to_thread(
                    self.registry().promote,
                    ro.state["candidate_ref"],
                    "production",
                    ROLLOUT_USER,
                    f"{ro.spec.strategy} rollout passed: {'; '.join(reasons)}",
                )
                promoted = mv.ref
            policy = SinglePolicy(ro.candidate)
            event = ro.event(action, reasons=reasons, numbers=numbers, promoted=promoted)
            updates = {
                "status": status,
                "finished_at": now_iso(),
                "promoted": promoted,
                "step": len(phases_of(ro.spec)) - 1,
                **ro.policy_state(policy),
            }
            await self.persist(ro, event, version=_int_or_none(ro.state.get("candidate_ref")), updates=updates)
            if router is not None:
                await ro.apply(policy)
                if not ro.spec.keep_standby:
                    await self.unload(ro.model, ro.baseline)
            log.info("rollout of %s: %s promoted (%s)", ro.model, ro.candidate, "; ".join(reasons))
            return
        policy = SinglePolicy(ro.baseline)
        if router is not None:
            await ro.apply(policy)  # traffic first: the candidate stops answering now
        elif not leave_traffic:
            ro.stage(policy)
        updates = {"status": status, "finished_at": now_iso(), "reason": "; ".join(reasons)}
        event = ro.event(action, reasons=reasons, numbers=numbers)
        try:
            await self.persist(ro, event, updates=updates)
        except Exception:  # the traffic already moved back: that stands even when the registry cannot record it now
            log.exception("rollout of %s: the %s could not be recorded in the registry", ro.model, action)
            ro.state.update(updates)
            ro.events.append(event)
        log.warning("rollout of %s: %s, %s serves (%s)", ro.model, status.replace("_", " "), ro.baseline, "; ".join(reasons))
        if router is not None:
            await self.unload(ro.model, ro.candidate)

    async def unload(self, model: str, label: str) -> None:
        """Unload ``model:label`` unless traffic still goes to it (drained: what it queued still answers)."""
        router = self.repository.routers.get(model)
        if router is None or label not in router.versions or (router.policy is not None and label in router.policy.targets()):
            return
        try:
            await self.repository.unload(model, label)
        except Exception:  # racing another unload: the version is gone either way
            log.exception("unloading %s:%s after its rollout failed", model, label)

    # operations ------------------------------------------------------------------------------------
    async def pause(self, model: str) -> dict[str, Any]:
        ro = self.get(model)
        async with ro.lock:
            if ro.status != "running":
                raise RolloutConflictError(f"The rollout of '{model}' is {ro.status}; only a running one can be paused.")
            await self.persist(ro, ro.event("pause", reasons=["paused by hand"]), updates={"status": "paused"})
        return ro.describe()

    async def resume(self, model: str) -> dict[str, Any]:
        ro = self.get(model)
        async with ro.lock:
            if ro.status != "paused":
                raise RolloutConflictError(f"The rollout of '{model}' is {ro.status}; only a paused one can be resumed.")
            await self.persist(ro, ro.event("resume", reasons=["resumed by hand"]), updates={"status": "running"})
            ro.window_start = self.clock()
            ro.start_task()
        return ro.describe()

    async def abort(self, model: str, reason: str = "aborted by hand") -> dict[str, Any]:
        ro = self.get(model)
        async with ro.lock:
            if ro.status not in ACTIVE:
                raise RolloutConflictError(f"The rollout of '{model}' is already {ro.status}.")
            await self.finish(ro, "aborted", "abort", [reason], leave_traffic=ro.status == "loading")
        return ro.describe()

    async def promote(self, model: str) -> dict[str, Any]:
        ro = self.get(model)
        async with ro.lock:
            if ro.status not in ACTIVE:
                raise RolloutConflictError(f"The rollout of '{model}' is already {ro.status}.")
            if ro.status == "loading":
                raise RolloutConflictError(
                    f"Version {ro.candidate} of '{model}' is still loading; it cannot be promoted before it has served.",
                    hint=f"Wait until `modelpress rollout status {model}` says running, or abort it.",
                )
            await self.finish(ro, "succeeded", "promote", ["promoted by hand"])
        return ro.describe()

    async def report(self, model: str) -> dict[str, Any]:
        """The A/B analysis of the candidate against the baseline (records copied here, the statistics in a thread)."""
        ro = self.get(model)
        snapshot = self.observations.copy_for(model)
        out = await asyncio.to_thread(compare, snapshot, model, ro.baseline, ro.candidate)
        out["rollout"] = {k: ro.state.get(k) for k in ("status", "step", "weights", "started_at", "finished_at")}
        return out

    async def rollback(self, model: str, why: str | None = None) -> dict[str, Any]:
        """Instant rollback of live traffic (see :func:`modelpress.rollout.rollback.rollback_live`)."""
        from modelpress.rollout.rollback import rollback_live

        return await rollback_live(self, model, why)

    # restart ---------------------------------------------------------------------------------------
    async def resume_all(self) -> list[str]:
        """Pick up every rollout the registry says was loading, running or paused for a model served here."""
        from modelpress.registry.engine import URL_ENV

        if self.registry_url is None and not os.environ.get(URL_ENV):
            from modelpress.serving.repository import registry_exists

            if not registry_exists():
                return []
        try:
            deployments = await asyncio.to_thread(lambda: self.registry().rollouts.list())
        except Exception:  # a registry that cannot be read leaves nothing to resume; the server still serves
            log.exception("could not read the rollouts to resume from the registry")
            return []
        resumed = []
        for dep in deployments:
            state = dep.get("rollout_state") or {}
            name = dep["name"]
            if state.get("status") not in ACTIVE or name not in self.repository.routers or name in self.rollouts:
                continue
            try:
                await self._resume_one(name, state)
                resumed.append(name)
            except Exception:  # one rollout that cannot resume must not stop the others or the server
                log.exception("could not resume the rollout of %s", name)
        return resumed

    async def _resume_one(self, name: str, state: dict[str, Any]) -> None:
        spec = parse_spec(state["spec"])
        state = {k: v for k, v in state.items() if k != "spec"}
        reg_model = state.get("registry_model")

        def source_of(label: str, ref: str | None) -> str | None:
            return ref or (f"{reg_model}:{label}" if reg_model else None)

        await self.ensure_loaded(name, state["baseline"], source_of(state["baseline"], state.get("baseline_ref")))
        if state["status"] != "loading":  # a loading rollout loads its candidate in the background again
            cand_ref = state.get("candidate_ref") or state.get("candidate_source")
            await self.ensure_loaded(name, state["candidate"], source_of(state["candidate"], cand_ref), spec.runtime)
        ro = Rollout(self, name, spec, state)
        ro.events = [e["decision"] for e in await asyncio.to_thread(self.registry().rollouts.events, name, self.MAX_EVENTS_IN_MEMORY)]
        self.rollouts[name] = ro
        if state["status"] == "loading":
            ro.applied = self.repository.routers[name].policy
        else:
            await ro.apply(policy_from_json(state["policy"]) if state.get("policy") else ro.policy_for_step())
        await self.persist(ro, ro.event("resume", reasons=["server restarted"]))
        ro.start_task()
        log.info("rollout of %s resumed at step %d (%s)", name, state["step"], state.get("weights"))

    async def close(self) -> None:
        """Stop watching (the state stays as recorded: a restarted server resumes it)."""
        tasks = []
        for ro in self.rollouts.values():
            if ro.task is not None and not ro.task.done():
                async with ro.lock:  # a decision being recorded finishes first: none is cut in half
                    ro.task.cancel()
                tasks.append(ro.task)
        for t in tasks:
            try:
                await t
            except asyncio.CancelledError:
                continue
            except Exception:  # stopping: the error is logged, the state stays as recorded
                log.exception("a rollout watcher ended with an error")
        self.rollouts.clear()
        if self._registry is not None:
            self._registry.close()
            self._registry = None

    def describe_all(self) -> dict[str, dict[str, Any]]:
        return {name: ro.describe() | {"events": list(ro.events[-10:])} for name, ro in self.rollouts.items()}


def _int_or_none(ref: str | None) -> int | None:
    if not ref or ":" not in ref:
        return None
    tail = ref.rsplit(":", 1)[1]
    return int(tail) if tail.isdigit() else None


__all__ = ["ROLLOUT_USER", "RolloutManager", "RolloutSpec", "parse_spec", "phases_of"]
