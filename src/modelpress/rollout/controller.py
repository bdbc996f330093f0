"""The rollout controller: canary, shadow-then-canary, blue-green and A/B, driven by live numbers.

    manager = server.rollouts
    await manager.start("minilm", RolloutSpec(candidate="2", strategy="canary", steps=[5, 25, 50, 100],
                                              window_s=60, max_error_rate=0.01, max_p99_ratio=1.2))

Each strategy is a list of phases; each phase holds a traffic policy for analysis windows:

* ``canary``: a sticky split giving the candidate each share in ``steps`` (5 -> 25 -> 50 -> 100);
* ``shadow-then-canary``: first ``shadow_windows`` windows of mirrored traffic (the candidate
  answers no client), then the canary steps;
* ``blue-green``: shadow windows, then one atomic switch of all traffic, watched for one window
  with the old version still loaded (a breach switches back at once);
* ``ab``: a fixed split (``steps[0]`` percent to the candidate) until promoted or stopped;
  every window is still checked against the thresholds.

At the end of each window the candidate is compared with its baseline: error rate against
``max_error_rate``, p99 latency ratio against ``max_p99_ratio`` and (in shadow phases) mean
output agreement against ``min_agreement``. A window with fewer than ``min_requests`` candidate
requests is extended. A breach rolls back at once (an error rate whose Wilson lower bound is
already past the limit breaches mid-window); a pass advances; passing the last step promotes
the candidate to production in the registry. ``pause``, ``resume``, ``abort`` and ``promote``
act by hand. Every decision, with its numbers, is a registry event, and the state (phase, step,
weights) is saved with it in one transaction, so a server restarted mid-rollout
(:meth:`RolloutManager.resume_all`, called when the server starts) resumes at the same step
with the same weights. A model not served from the registry is rolled out in memory only.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import math
import os
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelpress.errors import ConfigError, RolloutConflictError, RolloutNotFoundError
from modelpress.rollout.analysis import WindowStats, compare, evaluate
from modelpress.rollout.routing import DEFAULT_STICKY_HEADER, ShadowPolicy, SinglePolicy, SplitPolicy, TrafficPolicy, policy_from_json

log = logging.getLogger("modelpress.rollout")

STRATEGIES = ("canary", "shadow-then-canary", "blue-green", "ab")
ACTIVE = ("running", "paused")
MIN_TICK_S, MAX_TICK_S = 0.02, 1.0  # how often a running rollout looks at its window
TICKS_PER_WINDOW = 4
ROLLOUT_USER = "modelpress-rollout"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


class RolloutSpec(BaseModel):
    """What to roll out and the thresholds each analysis window is held to (unknown keys rejected)."""

    model_config = ConfigDict(extra="forbid")
    candidate: str  # version label of the candidate (the registry version number when served from the registry)
    baseline: str | None = None  # default: the version most traffic goes to now
    strategy: Literal["canary", "shadow-then-canary", "blue-green", "ab"] = "canary"
    steps: list[float] | None = None  # candidate percent per canary step (default 5, 25, 50, 100; ab: 50)
    window_s: float = Field(60.0, gt=0, le=86_400)
    max_error_rate: float = Field(0.01, ge=0, le=1)
    max_p99_ratio: float | None = Field(1.2, gt=0)
    min_agreement: float | None = Field(0.99, ge=-1, le=1)
    min_requests: int = Field(20, ge=1)  # candidate requests a window needs before it counts
    shadow_fraction: float = Field(1.0, gt=0, le=1)
    shadow_windows: int = Field(1, ge=1)
    sticky_header: str = DEFAULT_STICKY_HEADER
    source: str | None = None  # where to load the candidate when it is not loaded (default: REGISTRY_NAME:CANDIDATE)
    runtime: str | None = None  # the runtime to load the candidate on (default: the baseline's), e.g. onnxruntime for an ONNX variant
    promote: bool = True  # promote the candidate to production in the registry at the end
    keep_standby: bool = True  # keep the old version loaded after promotion, so `rollback` is instant

    @model_validator(mode="after")
    def _check_steps(self) -> RolloutSpec:
        if self.steps is None:
            self.steps = [50.0] if self.strategy == "ab" else [5.0, 25.0, 50.0, 100.0]
        if not self.steps or any(not (0 < s <= 100) or not math.isfinite(s) for s in self.steps):
            raise ValueError(f"steps must be candidate percentages in (0, 100], e.g. 5,25,50,100; got {self.steps}")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError(f"steps must increase, e.g. 5,25,50,100; got {self.steps}")
        if self.strategy in ("canary", "shadow-then-canary") and self.steps[-1] != 100:
            self.steps = [*self.steps, 100.0]
        if self.strategy == "ab" and (len(self.steps) != 1 or self.steps[0] >= 100):
            raise ValueError(f"an ab rollout holds one split: give one candidate share below 100, e.g. steps=[50]; got {self.steps}")
        return self


def parse_spec(data: dict[str, Any]) -> RolloutSpec:
    from modelpress.serving.config import validated

    return validated(RolloutSpec, data, "the rollout")


def phases_of(spec: RolloutSpec) -> list[dict[str, Any]]:
    """The strategy as phases: {"phase": "shadow"|"canary"|"switch"|"ab", "weight": candidate percent}."""
    steps = spec.steps or []
    shadow = [{"phase": "shadow", "weight": 0.0, "window": i} for i in range(spec.shadow_windows)]
    if spec.strategy == "canary":
        return [{"phase": "canary", "weight": w} for w in steps]
    if spec.strategy == "shadow-then-canary":
        return [*shadow, *({"phase": "canary", "weight": w} for w in steps)]
    if spec.strategy == "blue-green":
        return [*shadow, {"phase": "switch", "weight": 100.0}]
    return [{"phase": "ab", "weight": steps[0]}]


# -- running -----------------------------------------------------------------------------------
class Rollout:
    """One model's rollout: its persisted state, the policy it applies, and the task that watches it."""

    def __init__(self, manager: RolloutManager, model: str, spec: RolloutSpec, state: dict[str, Any]) -> None:
        self.manager = manager
        self.model = model
        self.spec = spec
        self.state = state
        self.lock = asyncio.Lock()
        self.window_start = time.monotonic()
        self.task: asyncio.Task | None = None
        self.events: list[dict[str, Any]] = []  # the latest decisions (the registry has them all)
        self.applied: TrafficPolicy | None = None  # the policy this rollout put on the router
        self._hold_noted = False

    # state ----------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self.state["status"]

    @property
    def baseline(self) -> str:
        return self.state["baseline"]

    @property
    def candidate(self) -> str:
        return self.state["candidate"]

    @property
    def phase(self) -> dict[str, Any]:
        phases = phases_of(self.spec)
        return phases[min(self.state["step"], len(phases) - 1)]

    def policy_for_step(self) -> TrafficPolicy:
        if self.status not in ACTIVE:
            return SinglePolicy(self.candidate if self.status == "succeeded" else self.baseline)
        return self.policy_for(self.state["step"])

    def policy_for(self, step: int) -> TrafficPolicy:
        """The traffic policy of phase ``step`` of this rollout."""
        phases = phases_of(self.spec)
        ph = phases[min(step, len(phases) - 1)]
        if ph["phase"] == "shadow":
            return ShadowPolicy(self.baseline, self.candidate, self.spec.shadow_fraction)
        if ph["weight"] >= 100:
            return SinglePolicy(self.candidate)
        w = float(ph["weight"])
        return SplitPolicy(
            {self.candidate: w, self.baseline: 100.0 - w}, sticky=True, sticky_header=self.spec.sticky_header, salt=self.model
        )

    def describe(self) -> dict[str, Any]:
        phases = phases_of(self.spec)
        out = dict(self.state)
        out["spec"] = self.spec.model_dump()
        out["phase"] = self.phase["phase"] if self.status in ACTIVE else "done"
        out["phases"] = phases
        out["window_elapsed_s"] = round(time.monotonic() - self.window_start, 3) if self.status == "running" else None
        out["persisted"] = self.manager.store_for(self) is not None
        return out

    def event(self, action: str, **extra: Any) -> dict[str, Any]:
        """A decision; its seq, step, phase and weights are filled in from the state it is persisted with."""
        return {"action": action, "at": _now(), **extra}

    def policy_state(self, policy: TrafficPolicy) -> dict[str, Any]:
        """The state keys that describe ``policy``: the policy, the weights of answered traffic, the shadow share."""
        if isinstance(policy, ShadowPolicy):
            return {"policy": policy.describe(), "weights": {self.baseline: 100.0}, "shadow": {self.candidate: policy.fraction}}
        return {"policy": policy.describe(), "weights": {k: round(v, 6) for k, v in policy.weights().items()}, "shadow": None}

    def stage(self, policy: TrafficPolicy) -> None:
        """Write ``policy`` into the state here (a fresh rollout, or traffic that has already moved)."""
        self.state.update(self.policy_state(policy))

    async def apply(self, policy: TrafficPolicy) -> None:
        """Route live traffic by ``policy`` (one assignment) and start a new window."""
        self.stage(policy)
        self.manager.server.repository.routers[self.model].set_policy(policy)
        self.applied = policy
        self.window_start = time.monotonic()
        self._hold_noted = False

    # the loop -------------------------------------------------------------------------------
    def start_task(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._watch(), name=f"rollout-{self.model}")

    async def _watch(self) -> None:
        tick = min(MAX_TICK_S, max(MIN_TICK_S, self.spec.window_s / TICKS_PER_WINDOW))
        while self.status in ACTIVE:
            await asyncio.sleep(tick)
            if self.status != "running":
                continue
            try:
                async with self.lock:
                    if self.status == "running":
                        await self._check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a registry hiccup must not kill the watcher: log it, try next tick
                log.exception("rollout of %s: the window check failed", self.model)

    def window_stats(self) -> tuple[WindowStats, WindowStats, bool]:
        obs = self.manager.server.observations
        shadow = self.phase["phase"] == "shadow"
        base = obs.window(self.model, self.baseline, self.window_start)
        cand = (
            obs.shadow_window(self.model, self.candidate, self.window_start)
            if shadow
            else obs.window(self.model, self.candidate, self.window_start)
        )
        return cand, base, shadow

    async def _check(self) -> None:
        router = self.manager.server.repository.routers.get(self.model)
        if router is None or router.policy is not self.applied:  # unloaded, or someone loaded another default meanwhile
            why = (
                "the model was unloaded"
                if router is None
                else f"the traffic policy was changed outside the rollout (now {router.policy.describe() if router.policy else None})"
            )
            await self.manager._finish(self, "aborted", "abort", [why], leave_traffic=True)
            return
        cand, base, shadow = self.window_stats()
        ref = self.state.get("reference_p99_ms")
        ref_s = ref / 1000 if ref is not None else None
        window_over = time.monotonic() - self.window_start >= self.spec.window_s
        verdict = evaluate(self.spec, cand, base, reference_p99=ref_s, shadow=shadow, early=not window_over)
        if verdict.action == "breach":
            await self.manager._finish(self, "rolled_back", "rollback", verdict.reasons, verdict.numbers)
            return
        if not window_over:
            return
        if verdict.action == "wait":
            if not self._hold_noted:
                self._hold_noted = True
                await self.manager._persist(self, self.event("hold", reasons=verdict.reasons, numbers=verdict.numbers))
            return
        updates: dict[str, Any] = {"windows": self.state.get("windows", 0) + 1}
        if base.latencies.size >= self.spec.min_requests and math.isfinite(base.p99):
            updates["reference_p99_ms"] = round(base.p99 * 1000, 3)
        if self.spec.strategy == "ab":
            await self.manager._persist(self, self.event("window", reasons=verdict.reasons, numbers=verdict.numbers), updates=updates)
            self.window_start = time.monotonic()
            return
        step = self.state["step"]
        if step + 1 >= len(phases_of(self.spec)):
            self.state.update(updates)
            await self.manager._finish(self, "succeeded", "promote", verdict.reasons, verdict.numbers)
            return
        policy = self.policy_for(step + 1)
        updates.update(step=step + 1, **self.policy_state(policy))
        event = self.event("advance", reasons=verdict.reasons, numbers=verdict.numbers, from_step=step, to=phases_of(self.spec)[step + 1])
        await self.manager._persist(self, event, updates=updates)  # recorded first: a crash from here on resumes at the new step
        await self.apply(policy)


class RolloutManager:
    """Every rollout of one server (``server.rollouts``); all methods run on the server's event loop."""

    MAX_EVENTS_IN_MEMORY = 200

    def __init__(self, server: Any) -> None:
        self.server = server
        self.rollouts: dict[str, Rollout] = {}
        self._registry: Any = None

    # the registry -------------------------------------------------------------------------------
    def registry(self) -> Any:
        if self._registry is None:
            from modelpress.registry.api import Registry

            self._registry = Registry(self.server.config.registry)
        return self._registry

    def store_for(self, ro: Rollout) -> Any:
        return self.registry().rollouts if ro.state.get("registry_model") else None

    async def _persist(
        self, ro: Rollout, event: dict[str, Any] | None, *, version: int | None = None, updates: dict[str, Any] | None = None
    ) -> None:
        """Write the state (with ``updates``) and ``event`` to the registry in one transaction; then make them current here."""
        state = {**ro.state, **(updates or {}), "updated_at": _now()}
        if event is not None:
            phases = phases_of(ro.spec)
            state["seq"] = state.get("seq", 0) + 1
            event = {
                **event,
                "seq": state["seq"],
                "step": state["step"],
                "phase": phases[min(state["step"], len(phases) - 1)]["phase"],
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

    def _router(self, model: str) -> Any:
        router = self.server.repository.routers.get(model)
        if router is None or router.policy is None:
            raise RolloutNotFoundError(
                f"No model named '{model}' is served here.", hint=f"Served: {', '.join(self.server.repository.names()) or 'none'}."
            )
        return router

    # starting -------------------------------------------------------------------------------------
    async def start(self, model: str, spec: RolloutSpec | dict[str, Any]) -> dict[str, Any]:
        """Start a rollout of ``spec.candidate`` for served model ``model`` (loading the candidate if needed)."""
        spec = spec if isinstance(spec, RolloutSpec) else parse_spec(spec)
        current = self.rollouts.get(model)
        if current is not None and current.status in ACTIVE:
            raise RolloutConflictError(
                f"A {current.spec.strategy} rollout of '{model}' to version {current.candidate} is {current.status}.",
                hint=f"Wait for it, or stop it first: modelpress rollout abort {model}",
            )
        router = self._router(model)
        baseline = spec.baseline or router.policy.main
        if baseline not in router.versions:
            raise ConfigError(f"The baseline version '{baseline}' of '{model}' is not loaded.", hint=router._versions_hint())
        if spec.candidate == baseline:
            raise ConfigError(
                f"The candidate is the baseline itself (version {baseline}).", hint="Name another version: --candidate VERSION"
            )
        base_lv = router.versions[baseline]
        registry_model = base_lv.registry_ref.split(":")[0] if base_lv.registry_ref else None
        source = spec.source or (f"{registry_model}:{spec.candidate}" if registry_model else None)
        await self._ensure_loaded(model, spec.candidate, source, spec.runtime)
        cand_lv = router.versions[spec.candidate]
        state = {
            "model": model,
            "status": "running",
            "step": 0,
            "windows": 0,
            "baseline": baseline,
            "candidate": spec.candidate,
            "registry_model": registry_model,
            "baseline_ref": base_lv.registry_ref,
            "candidate_ref": cand_lv.registry_ref,
            "candidate_source": source,
            "started_at": _now(),
            "seq": 0,
        }
        ro = Rollout(self, model, spec, state)
        policy = ro.policy_for_step()
        ro.stage(policy)
        self.rollouts[model] = ro
        try:
            await self._persist(ro, ro.event("start", spec=spec.model_dump()), version=_int_or_none(base_lv.registry_ref))
        except BaseException:
            self.rollouts.pop(model, None)
            raise
        await ro.apply(policy)
        ro.start_task()
        log.info("rollout of %s: %s %s -> %s started", model, spec.strategy, baseline, spec.candidate)
        return ro.describe()

    async def _ensure_loaded(self, model: str, label: str, source: str | None, runtime: str | None = None) -> None:
        router = self.server.repository.routers[model]
        if label in router.versions:
            return
        if source is None:
            raise ConfigError(
                f"Version '{label}' of '{model}' is not loaded, and '{model}' is not served from the registry, so there is nowhere to load it from.",
                hint=f'Load it first (POST /v2/repository/models/{model}/load with {{"parameters": {{"config": "{{\\"source\\": \\"FOLDER\\", \\"version\\": \\"{label}\\"}}"}}}}), or pass "source".',
            )
        repo = self.server.repository
        cfg = repo.config_for(model, {"source": source, "version": label, **({"runtime": runtime} if runtime else {})})
        await repo.load(cfg, make_default=False, retire_previous=False)

    # the end of a rollout -----------------------------------------------------------------------
    async def _finish(
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

        ``leave_traffic``: the router is no longer the rollout's to steer (unloaded, or re-pointed by hand): only record.
        """
        router = None if leave_traffic else self.server.repository.routers.get(ro.model)
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
                "finished_at": _now(),
                "promoted": promoted,
                "step": len(phases_of(ro.spec)) - 1,
                **ro.policy_state(policy),
            }
            await self._persist(ro, event, version=_int_or_none(ro.state.get("candidate_ref")), updates=updates)
            if router is not None:
                await ro.apply(policy)
                if not ro.spec.keep_standby:
                    await self._unload(ro.model, ro.baseline)
            log.info("rollout of %s: %s promoted (%s)", ro.model, ro.candidate, "; ".join(reasons))
            return
        policy = SinglePolicy(ro.baseline)
        if router is not None:
            await ro.apply(policy)  # traffic first: the candidate stops answering now
        elif not leave_traffic:
            ro.stage(policy)
        updates = {"status": status, "finished_at": _now(), "reason": "; ".join(reasons)}
        event = ro.event(action, reasons=reasons, numbers=numbers)
        try:
            await self._persist(ro, event, updates=updates)
        except Exception:  # the traffic already moved back: that stands even when the registry cannot record it now
            log.exception("rollout of %s: the %s could not be recorded in the registry", ro.model, action)
            ro.state.update(updates)
            ro.events.append(event)
        log.warning("rollout of %s: %s back to %s (%s)", ro.model, action, ro.baseline, "; ".join(reasons))
        if router is not None:
            await self._unload(ro.model, ro.candidate)

    async def _unload(self, model: str, label: str) -> None:
        router = self.server.repository.routers.get(model)
        if router is None or label not in router.versions or (router.policy is not None and label in router.policy.targets()):
            return
        try:
            await self.server.repository.unload(model, label)  # drains: what it queued still answers
        except Exception:  # pragma: no cover - racing another unload
            log.exception("unloading %s:%s after its rollout failed", model, label)

    # operations ------------------------------------------------------------------------------------
    async def pause(self, model: str) -> dict[str, Any]:
        ro = self.get(model)
        async with ro.lock:
            if ro.status != "running":
                raise RolloutConflictError(f"The rollout of '{model}' is {ro.status}; only a running one can be paused.")
            await self._persist(ro, ro.event("pause", reasons=["paused by hand"]), updates={"status": "paused"})
        return ro.describe()

    async def resume(self, model: str) -> dict[str, Any]:
        ro = self.get(model)
        async with ro.lock:
            if ro.status != "paused":
                raise RolloutConflictError(f"The rollout of '{model}' is {ro.status}; only a paused one can be resumed.")
            await self._persist(ro, ro.event("resume", reasons=["resumed by hand"]), updates={"status": "running"})
            ro.window_start = time.monotonic()
            ro.start_task()
        return ro.describe()

    async def abort(self, model: str, reason: str = "aborted by hand") -> dict[str, Any]:
        ro = self.get(model)
        async with ro.lock:
            if ro.status not in ACTIVE:
                raise RolloutConflictError(f"The rollout of '{model}' is already {ro.status}.")
            await self._finish(ro, "aborted", "abort", [reason])
        return ro.describe()

    async def promote(self, model: str) -> dict[str, Any]:
        ro = self.get(model)
        async with ro.lock:
            if ro.status not in ACTIVE:
                raise RolloutConflictError(f"The rollout of '{model}' is already {ro.status}.")
            await self._finish(ro, "succeeded", "promote", ["promoted by hand"])
        return ro.describe()

    async def report(self, model: str) -> dict[str, Any]:
        """The A/B analysis of the candidate against the baseline (records copied here, the statistics in a thread)."""
        ro = self.get(model)
        snapshot = self.server.observations.copy_for(model)
        out = await asyncio.to_thread(compare, snapshot, model, ro.baseline, ro.candidate)
        out["rollout"] = {k: ro.state.get(k) for k in ("status", "step", "weights", "started_at", "finished_at")}
        return out

    async def rollback(self, model: str, why: str | None = None) -> dict[str, Any]:
        """Instant rollback of live traffic, recorded in the registry as `registry rollback` records it.

        During a rollout: abort it (the baseline, still production, takes all traffic back).
        Otherwise: the previous production version (from the registry's stage history) is
        loaded unless it is still standing by, the registry rolls back, and traffic switches in
        one step; the version rolled back from drains and unloads.
        """
        ro = self.rollouts.get(model)
        if ro is not None and ro.status in ACTIVE:
            desc = await self.abort(model, why or "rolled back by hand")
            return {"model": model, "serving": ro.baseline, "registry_changed": False, "rollout": desc}
        router = self._router(model)
        current = router.policy.main
        lv = router.versions[current]
        if not lv.registry_ref:
            raise ConfigError(
                f"'{model}' is not served from the registry, so there is no production history to roll back along.",
                hint=f"Serve it as {model}@production, or load the version you want by hand (POST /v2/repository/models/{model}/load).",
            )
        reg_model = lv.registry_ref.split(":")[0]
        prod, target = await asyncio.to_thread(self.registry().rollouts.rollback_target, reg_model)
        if str(prod) != current:
            raise RolloutConflictError(
                f"'{model}' serves version {current}, but the registry's production version is {prod}; a rollback would not move traffic off what it serves.",
                hint=f"Load {reg_model}@production first, or use `modelpress registry rollback {reg_model}` to change the registry alone.",
            )
        label = str(target)
        await self._ensure_loaded(model, label, f"{reg_model}:{target}")
        mv = await asyncio.to_thread(self.registry().rollback, reg_model, None, why or f"modelpress rollback of {model} (live traffic)")
        router.set_policy(SinglePolicy(label))
        with_state = {
            "model": model,
            "status": "rolled_back",
            "baseline": label,
            "candidate": current,
            "registry_model": reg_model,
            "policy": router.policy.describe(),
            "weights": {label: 100.0},
            "finished_at": _now(),
            "reason": why or "rolled back by hand",
        }
        event = {
            "action": "rollback",
            "at": _now(),
            "from": current,
            "to": label,
            "registry": f"{mv.ref} back in production",
            "reasons": [why or "rolled back by hand"],
        }
        await asyncio.to_thread(
            self.registry().rollouts.save,
            model,
            model=reg_model,
            version=mv.version,
            traffic_policy=router.policy.describe(),
            rollout_state=with_state,
            event=event,
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
        await self._unload(model, current)
        return {"model": model, "serving": label, "from": current, "registry_changed": True, "production": mv.ref}

    # restart ---------------------------------------------------------------------------------------
    async def resume_all(self) -> list[str]:
        """Pick up every rollout the registry says was running or paused for a model served here."""
        from modelpress.registry.engine import URL_ENV

        if self.server.config.registry is None and not os.environ.get(URL_ENV):
            from modelpress.serving.repository import _registry_exists

            if not _registry_exists():
                return []
        try:
            deployments = await asyncio.to_thread(lambda: self.registry().rollouts.list())
        except Exception:
            log.exception("could not read the rollouts to resume from the registry")
            return []
        resumed = []
        for dep in deployments:
            state = dep.get("rollout_state") or {}
            name = dep["name"]
            if state.get("status") not in ACTIVE or name not in self.server.repository.routers or name in self.rollouts:
                continue
            try:
                await self._resume_one(name, state)
                resumed.append(name)
            except Exception:
                log.exception("could not resume the rollout of %s", name)
        return resumed

    async def _resume_one(self, name: str, state: dict[str, Any]) -> None:
        spec = parse_spec(state["spec"])
        state = {k: v for k, v in state.items() if k != "spec"}
        reg_model = state.get("registry_model")
        for label, ref in (
            (state["baseline"], state.get("baseline_ref")),
            (state["candidate"], state.get("candidate_ref") or state.get("candidate_source")),
        ):
            await self._ensure_loaded(
                name, label, ref or (f"{reg_model}:{label}" if reg_model else None), spec.runtime if label == state["candidate"] else None
            )
        ro = Rollout(self, name, spec, state)
        ro.events = [e["decision"] for e in await asyncio.to_thread(self.registry().rollouts.events, name, self.MAX_EVENTS_IN_MEMORY)]
        policy = policy_from_json(state["policy"]) if state.get("policy") else ro.policy_for_step()
        self.rollouts[name] = ro
        await ro.apply(policy)
        await self._persist(ro, ro.event("resume", reasons=["server restarted"]))
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
            except (asyncio.CancelledError, Exception):
                pass
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
