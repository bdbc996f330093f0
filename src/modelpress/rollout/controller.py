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

Several servers on one registry: the one holding the model's lease drives its rollout, the
others follow the recorded split and take over when the lease expires; a rollback the registry
could not record is retried and never undone (:mod:`modelpress.rollout.ownership`; the manager's part that does
it: :mod:`modelpress.rollout.followers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from modelpress._fs import crash_point
from modelpress.errors import ConfigError, RolloutConflictError, RolloutNotFoundError
from modelpress.rollout.analysis import compare
from modelpress.rollout.followers import Followers
from modelpress.rollout.observations import Observations
from modelpress.rollout.ownership import default_owner, journal_for, lease_seconds
from modelpress.rollout.routing import SinglePolicy
from modelpress.rollout.spec import ACTIVE, RolloutSpec, now_iso, parse_spec, phases_of
from modelpress.rollout.watch import Rollout

log = logging.getLogger("modelpress.rollout")

ROLLOUT_USER = "modelpress-rollout"


class RolloutManager(Followers):
    """Every rollout of one server; all methods run on the server's event loop.

    ``repository``: the server's :class:`~modelpress.serving.repository.ModelRepository`;
    ``observations``: what each version did; ``registry``: the registry URL or file (None: the
    default one); ``clock``: the time windows are measured on (default :func:`time.monotonic`);
    ``owner``: this server's id for rollout leases, ``lease_s`` their time
    (:mod:`modelpress.rollout.ownership`).
    """

    MAX_EVENTS_IN_MEMORY = 200

    def __init__(
        self,
        repository: Any,
        observations: Observations,
        registry: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        owner: str | None = None,
        lease_s: float | None = None,
    ) -> None:
        self.repository = repository
        self.observations = observations
        self.registry_url = registry
        self.clock = clock
        self.rollouts: dict[str, Rollout] = {}
        self._registry: Any = None
        self.owner = owner or default_owner()
        self.lease_s = lease_s if lease_s is not None else lease_seconds()
        self.leases: dict[str, Any] = {}  # model -> the registry Lease this server holds
        self.pending: dict[str, dict[str, Any]] = {}  # model -> a decision the registry has not recorded yet
        self.journal = journal_for(self.owner)
        self._tasks: set[asyncio.Task] = set()
        self._sync_task: asyncio.Task | None = None
        self._seen_updates: dict[str, str] = {}  # model -> the deployment as this server last saw it (_deployment_mark)
        self._sync_lock = asyncio.Lock()  # one sync at a time (the background one and a test's or resume_all's)

    # the registry -------------------------------------------------------------------------------
    def registry(self) -> Any:
        if self._registry is None:
            from modelpress.registry.api import Registry

            self._registry = Registry(self.registry_url)
        return self._registry

    def store_for(self, ro: Rollout) -> Any:
        return self.registry().rollouts if ro.state.get("registry_model") else None

    def _prepare(
        self, ro: Rollout, event: dict[str, Any] | None, updates: dict[str, Any] | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The state (with ``updates``) and the full event (seq, step, phase, weights) a decision records."""
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
        return state, event

    async def persist(
        self,
        ro: Rollout,
        event: dict[str, Any] | None,
        *,
        version: int | None = None,
        updates: dict[str, Any] | None = None,
        promote: tuple[str, str, str] | None = None,
    ) -> None:
        """Write the state (with ``updates``) and ``event`` to the registry in one transaction; then make them current here.

        The write is fenced: it needs this server's lease of the model and the recorded state's
        ``seq`` to be the one this rollout last saw. Losing either makes this server a follower.
        """
        state, event = self._prepare(ro, event, updates)
        store = self.store_for(ro)
        if store is not None:
            from modelpress.registry.leases import LeaseLostError
            from modelpress.registry.rollouts import StaleRolloutStateError

            lease = self.leases.get(ro.model)
            if lease is None:
                self._demote(ro)
                raise LeaseLostError(
                    f"This server ({self.owner}) does not hold the rollout lease of '{ro.model}'; the decision was not recorded.",
                    hint="Another server drives this rollout; send rollout commands to it.",
                )
            try:
                await asyncio.to_thread(
                    store.save,
                    ro.model,
                    model=state["registry_model"],
                    version=version,
                    traffic_policy=state.get("policy"),
                    rollout_state={**state, "spec": ro.spec.model_dump()},
                    event=event,
                    lease=(lease.owner, lease.seq),
                    expect_seq=ro.state.get("seq", 0) if ro.recorded else None,
                    promote=promote,
                )
            except (LeaseLostError, StaleRolloutStateError):
                self._demote(ro)
                raise
            ro.recorded = True
            crash_point(f"rollout-recorded:{event['action'] if event else 'state'}")  # fault runs: recorded, not applied here yet
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

    def driven(self, model: str) -> Rollout:
        """The rollout of ``model`` if this server drives it; a 409 naming the server that does otherwise."""
        ro = self.get(model)
        if not ro.driving and ro.status in ACTIVE:
            raise RolloutConflictError(
                f"The rollout of '{model}' is driven by the server {ro.following or 'holding its lease'}; this server follows it.",
                hint=f"Send the command to that server (modelpress rollout ... --url URL), or wait {self.lease_s:g} s "
                "for its lease to expire if it is down: a follower then takes the rollout over.",
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
            self.driven(model)  # another server's rollout: the 409 names it
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
        if model in self.pending:
            raise RolloutConflictError(
                f"The rollback of '{model}' is not recorded in the registry yet; "
                "this server keeps all traffic on the baseline until it is.",
                hint="Check that the registry is reachable; start again once `modelpress rollout status` says recorded.",
            )
        ro = Rollout(self, model, spec, state)
        self._forget_unserved()
        if self.store_for(ro) is not None:
            await self.claim(model)
        policy = ro.policy_for_step() if cand_lv is not None else router.policy  # loading: traffic stays as it is
        ro.stage(policy)
        previous = self.rollouts.get(model)
        self.rollouts[model] = ro
        try:
            await self.persist(ro, ro.event("start", spec=spec.model_dump()), version=_int_or_none(base_lv.registry_ref))
        except BaseException:
            if previous is not None:
                self.rollouts[model] = previous
            else:
                self.rollouts.pop(model, None)
            await self._release(model)
            raise
        if cand_lv is not None:
            await ro.apply(policy)
        else:
            ro.applied = policy
        ro.start_task()
        log.info("rollout of %s: %s %s -> %s %s", model, spec.strategy, baseline, spec.candidate, ro.status)
        return ro.describe()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
            promoted = promote = None
            if ro.spec.promote and ro.state.get("candidate_ref") and self.store_for(ro) is not None:
                promoted = ro.state["candidate_ref"]
                promote = (promoted, ROLLOUT_USER, f"{ro.spec.strategy} rollout passed: {'; '.join(reasons)}")
            policy = SinglePolicy(ro.candidate)
            event = ro.event(action, reasons=reasons, numbers=numbers, promoted=promoted)
            updates = {
                "status": status,
                "finished_at": now_iso(),
                "promoted": promoted,
                "step": len(phases_of(ro.spec)) - 1,
                **ro.policy_state(policy),
            }
            await self.persist(ro, event, version=_int_or_none(ro.state.get("candidate_ref")), updates=updates, promote=promote)
            await self._release(ro.model)
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
        except Exception as exc:  # the traffic already moved back: that stands, and the record is retried until it lands
            if self.store_for(ro) is None:
                raise
            self._hold_unrecorded(ro, event, updates, exc)
        else:
            await self._release(ro.model)
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
        self.observations.prune()

    # operations ------------------------------------------------------------------------------------
    async def pause(self, model: str) -> dict[str, Any]:
        ro = self.driven(model)
        async with ro.lock:
            if ro.status != "running":
                raise RolloutConflictError(f"The rollout of '{model}' is {ro.status}; only a running one can be paused.")
            await self.persist(ro, ro.event("pause", reasons=["paused by hand"]), updates={"status": "paused"})
        return ro.describe()

    async def resume(self, model: str) -> dict[str, Any]:
        ro = self.driven(model)
        async with ro.lock:
            if ro.status != "paused":
                raise RolloutConflictError(f"The rollout of '{model}' is {ro.status}; only a paused one can be resumed.")
            await self.persist(ro, ro.event("resume", reasons=["resumed by hand"]), updates={"status": "running"})
            ro.window_start = self.clock()
            ro.start_task()
        return ro.describe()

    async def abort(self, model: str, reason: str = "aborted by hand") -> dict[str, Any]:
        ro = self.driven(model)
        async with ro.lock:
            if ro.status not in ACTIVE:
                raise RolloutConflictError(f"The rollout of '{model}' is already {ro.status}.")
            await self.finish(ro, "aborted", "abort", [reason], leave_traffic=ro.status == "loading")
        return ro.describe()

    async def promote(self, model: str) -> dict[str, Any]:
        ro = self.driven(model)
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

    async def close(self) -> None:
        """Stop watching and following; hand the leases back (the state stays as recorded: a restarted server resumes it)."""
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        for task in list(self._tasks):  # unrecorded decisions stay in the journal for the next start
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
        for model in list(self.leases):
            if model not in self.pending:  # handed back: another server may take the rollout over at once
                await self._release(model)
        self.leases.clear()
        self.pending.clear()
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
