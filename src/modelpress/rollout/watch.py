"""One model's rollout: its state, the policy of its step, and the task that loads its candidate and judges each window.

At the end of each window the candidate is compared with its baseline
(:func:`~modelpress.rollout.analysis.evaluate`): error rate against ``max_error_rate``, p99
latency ratio against ``max_p99_ratio`` and (in shadow phases) mean output agreement against
``min_agreement``. A window with fewer than ``min_requests`` candidate requests is extended. A
breach rolls back at once (an error rate whose Wilson lower bound is already past the limit
breaches mid-window); a pass advances; passing the last step promotes.

Times come from the manager's ``clock`` (default :func:`time.monotonic`): a test drives the
windows with a fake clock and calls :meth:`Rollout.check` itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from modelpress.rollout.analysis import WindowStats, evaluate
from modelpress.rollout.routing import ShadowPolicy, SinglePolicy, TrafficPolicy
from modelpress.rollout.spec import ACTIVE, RolloutSpec, now_iso, phase_policy, phases_of

log = logging.getLogger("modelpress.rollout")

MIN_TICK_S, MAX_TICK_S = 0.02, 1.0  # how often a running rollout looks at its window
TICKS_PER_WINDOW = 4


class Rollout:
    """One model's rollout: its persisted state, the policy it applies, and the task that watches it.

    ``manager``: the :class:`~modelpress.rollout.controller.RolloutManager` it belongs to (it
    persists decisions, finishes rollouts, loads and unloads versions).
    """

    def __init__(self, manager: Any, model: str, spec: RolloutSpec, state: dict[str, Any]) -> None:
        self.manager = manager
        self.model = model
        self.spec = spec
        self.state = state
        self.lock = asyncio.Lock()
        self.window_start = manager.clock()
        self.task: asyncio.Task | None = None
        self.events: list[dict[str, Any]] = []  # the latest decisions (the registry has them all)
        self.applied: TrafficPolicy | None = None  # the policy this rollout put on the router
        self._hold_noted = False
        self.driving = True  # False: another server holds the lease and decides; this one follows the registry
        self.following: str | None = None  # the server this one follows (its lease owner)
        self.recorded = False  # the registry has a decision of this rollout (its writes then expect the recorded seq)

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
        return phase_policy(self.spec, step, self.model, self.baseline, self.candidate)

    def describe(self) -> dict[str, Any]:
        out = dict(self.state)
        out["spec"] = self.spec.model_dump()
        out["phase"] = "loading" if self.status == "loading" else self.phase["phase"] if self.status in ACTIVE else "done"
        out["phases"] = phases_of(self.spec)
        out["window_elapsed_s"] = round(self.manager.clock() - self.window_start, 3) if self.status == "running" else None
        out["persisted"] = self.manager.store_for(self) is not None
        out["controller"] = self.manager.owner if self.driving else self.following
        out["driving"] = self.driving
        return out

    def event(self, action: str, **extra: Any) -> dict[str, Any]:
        """A decision; its seq, step, phase and weights are filled in from the state it is persisted with."""
        return {"action": action, "at": now_iso(), **extra}

    def policy_state(self, policy: TrafficPolicy) -> dict[str, Any]:
        """The state keys that describe ``policy``: the policy, the weights of answered traffic, the shadow share."""
        if isinstance(policy, ShadowPolicy):
            return {"policy": policy.describe(), "weights": {policy.primary: 100.0}, "shadow": {policy.candidate: policy.fraction}}
        return {"policy": policy.describe(), "weights": {k: round(v, 6) for k, v in policy.weights().items()}, "shadow": None}

    def stage(self, policy: TrafficPolicy) -> None:
        """Write ``policy`` into the state here (a fresh rollout, or traffic that has already moved)."""
        self.state.update(self.policy_state(policy))

    async def apply(self, policy: TrafficPolicy) -> None:
        """Route live traffic by ``policy`` (one assignment) and start a new window."""
        self.stage(policy)
        self.manager.repository.routers[self.model].set_policy(policy)
        self.applied = policy
        self.window_start = self.manager.clock()
        self._hold_noted = False

    # the task -------------------------------------------------------------------------------
    def start_task(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name=f"rollout-{self.model}")

    async def _run(self) -> None:
        if self.status == "loading" and not await self._load_candidate():
            return
        await self._watch()

    async def _load_candidate(self) -> bool:
        """Load the candidate (in the background: the start call has returned), then move traffic to step 0."""
        source, runtime = self.state.get("candidate_source"), self.spec.runtime
        try:
            lv = await self.manager.ensure_loaded(self.model, self.candidate, source, runtime)
        except Exception as exc:  # noqa: BLE001  (any load failure ends the rollout, with its message as the reason)
            why = f"version {self.candidate} could not be loaded from {source}: {getattr(exc, 'message', None) or exc}"
            async with self.lock:
                if self.status == "loading":
                    await self.manager.finish(self, "failed", "abort", [why], leave_traffic=True)
            return False
        async with self.lock:
            if self.status != "loading":  # aborted while it loaded: it never got traffic
                await self.manager.unload(self.model, self.candidate)
                return False
            policy = self.policy_for(0)
            updates = {"status": "running", "candidate_ref": lv.registry_ref, **self.policy_state(policy)}
            reason = f"version {self.candidate} loaded on {lv.runtime} in {lv.load_seconds:.2f} s"
            await self.manager.persist(self, self.event("loaded", reasons=[reason], runtime=lv.runtime), updates=updates)
            await self.apply(policy)
        log.info("rollout of %s: %s", self.model, reason)
        return True

    async def _watch(self) -> None:
        tick = min(MAX_TICK_S, max(MIN_TICK_S, self.spec.window_s / TICKS_PER_WINDOW))
        while self.status in ACTIVE and self.driving:
            await asyncio.sleep(tick)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a registry hiccup must not kill the watcher: log it, try next tick
                log.exception("rollout of %s: the window check failed", self.model)

    def window_stats(self) -> tuple[WindowStats, WindowStats, bool]:
        obs = self.manager.observations
        shadow = self.phase["phase"] == "shadow"
        base = obs.window(self.model, self.baseline, self.window_start)
        cand = (
            obs.shadow_window(self.model, self.candidate, self.window_start)
            if shadow
            else obs.window(self.model, self.candidate, self.window_start)
        )
        return cand, base, shadow

    async def check(self) -> None:
        """Judge the current window once, if the rollout is running (what the watcher does every tick)."""
        async with self.lock:
            if self.status == "running" and self.driving:
                await self._check()

    async def _check(self) -> None:
        router = self.manager.repository.routers.get(self.model)
        if router is None or router.policy is not self.applied:  # unloaded, or someone loaded another default meanwhile
            why = (
                "the model was unloaded"
                if router is None
                else f"the traffic policy was changed outside the rollout (now {router.policy.describe() if router.policy else None})"
            )
            await self.manager.finish(self, "aborted", "abort", [why], leave_traffic=True)
            return
        cand, base, shadow = self.window_stats()
        ref = self.state.get("reference_p99_ms")
        ref_s = ref / 1000 if ref is not None else None
        window_over = self.manager.clock() - self.window_start >= self.spec.window_s
        verdict = evaluate(self.spec, cand, base, reference_p99=ref_s, shadow=shadow, early=not window_over)
        if verdict.action == "breach":
            await self.manager.finish(self, "rolled_back", "rollback", verdict.reasons, verdict.numbers)
            return
        if not window_over:
            return
        if verdict.action == "wait":
            if not self._hold_noted:
                self._hold_noted = True
                await self.manager.persist(self, self.event("hold", reasons=verdict.reasons, numbers=verdict.numbers))
            return
        updates: dict[str, Any] = {"windows": self.state.get("windows", 0) + 1}
        if base.latencies.size >= self.spec.min_requests and math.isfinite(base.p99):
            updates["reference_p99_ms"] = round(base.p99 * 1000, 3)
        if self.spec.strategy == "ab":
            await self.manager.persist(self, self.event("window", reasons=verdict.reasons, numbers=verdict.numbers), updates=updates)
            self.window_start = self.manager.clock()
            return
        step = self.state["step"]
        phases = phases_of(self.spec)
        if step + 1 >= len(phases):
            self.state.update(updates)
            await self.manager.finish(self, "succeeded", "promote", verdict.reasons, verdict.numbers)
            return
        policy = self.policy_for(step + 1)
        updates.update(step=step + 1, **self.policy_state(policy))
        event = self.event("advance", reasons=verdict.reasons, numbers=verdict.numbers, from_step=step, to=phases[step + 1])
        await self.manager.persist(self, event, updates=updates)  # recorded first: a crash from here on resumes at the new step
        await self.apply(policy)


__all__ = ["Rollout"]
