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
could not record is retried and never undone (:mod:`modelpress.rollout.ownership`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from modelpress._fs import crash_point
from modelpress.errors import ConfigError, RolloutConflictError, RolloutNotFoundError
from modelpress.rollout.analysis import compare
from modelpress.rollout.observations import Observations
from modelpress.rollout.ownership import RETRY_MAX_S, RETRY_MIN_S, default_owner, journal_for, lease_seconds, sync_seconds
from modelpress.rollout.routing import SinglePolicy, policy_from_json
from modelpress.rollout.spec import ACTIVE, RolloutSpec, now_iso, parse_spec, phases_of
from modelpress.rollout.watch import Rollout

log = logging.getLogger("modelpress.rollout")

ROLLOUT_USER = "modelpress-rollout"


class RolloutManager:
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

    # leases ------------------------------------------------------------------------------------------
    async def claim(self, model: str) -> Any:
        """Take the rollout lease of ``model`` (or keep it); a 409 naming the holder when another server has it."""
        leases = self.registry().leases
        lease = await asyncio.to_thread(leases.acquire, model, self.owner, self.lease_s)
        if lease is None:
            held = await asyncio.to_thread(leases.get, model)
            left = max(0.0, (held.expires_at or 0) - time.time()) if held is not None else 0.0
            follower = self.rollouts.get(model)
            if follower is not None and held is not None:
                follower.following = held.owner
            raise RolloutConflictError(
                f"The rollout of '{model}' is driven by the server {held.owner if held else '?'} (its lease runs {left:.0f} s more).",
                hint="Send rollout commands to that server; if it is down, a follower takes the rollout over when its lease expires.",
            )
        self.leases[model] = lease
        return lease

    async def _release(self, model: str) -> None:
        lease = self.leases.pop(model, None)
        if lease is not None:
            try:
                await asyncio.to_thread(self.registry().leases.release, lease)
            except Exception:  # noqa: BLE001  (the lease then expires by itself)
                log.warning("could not release the rollout lease of %s; it expires in %g s", model, self.lease_s)

    def _demote(self, ro: Rollout) -> None:
        """This server no longer drives ``ro`` (its lease or its view of the state is gone): stop deciding, follow."""
        self.leases.pop(ro.model, None)
        if ro.driving:
            log.warning("rollout of %s: this server (%s) lost the lease; it follows the registry from now", ro.model, self.owner)
        ro.driving = False
        if ro.task is not None and ro.task is not asyncio.current_task() and not ro.task.done():
            ro.task.cancel()

    def _forget_unserved(self) -> None:
        """Drop the finished rollouts of models no longer served (the map holds at most one per served model then)."""
        for name in [n for n, ro in self.rollouts.items() if n not in self.repository.routers and ro.status not in ACTIVE]:
            if name not in self.pending:
                del self.rollouts[name]
        for name in [n for n in self._seen_updates if n not in self.repository.routers]:
            del self._seen_updates[name]

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

    # decisions the registry has not recorded --------------------------------------------------------
    def _hold_unrecorded(self, ro: Rollout, event: dict[str, Any], updates: dict[str, Any], exc: BaseException) -> None:
        """Keep ``ro`` finished here (traffic on the baseline), journal the decision, and record it in the background."""
        expect = ro.state.get("seq", 0) if ro.recorded else None
        state, full_event = self._prepare(ro, event, {**updates, "recorded": False})
        doc = {
            "model": ro.model,
            "registry_model": state["registry_model"],
            "expect_seq": expect,
            "state": {**state, "recorded": True, "spec": ro.spec.model_dump()},
            "event": full_event,
        }
        log.error(
            "rollout of %s: the %s could not be recorded in the registry (%s); all traffic stays on %s, and the record is retried",
            ro.model,
            event.get("action"),
            getattr(exc, "message", None) or exc,
            ro.baseline,
        )
        ro.state.clear()
        ro.state.update(state)
        if full_event is not None:
            ro.events.append(full_event)
        ro.driving = True  # still this server's decision to record; nobody else's split is followed meanwhile
        self.pending[ro.model] = doc
        try:
            self.journal.write(ro.model, doc)
        except OSError:
            log.exception("rollout of %s: the unrecorded decision could not be journaled either", ro.model)
        self._spawn(self._record_pending(ro.model), f"rollout-record-{ro.model}")

    def _save_pending(self, doc: dict[str, Any]) -> None:
        from modelpress.registry.rollouts import StaleRolloutStateError

        try:
            self.registry().rollouts.save(
                doc["model"],
                model=doc["registry_model"],
                traffic_policy=doc["state"].get("policy"),
                rollout_state=doc["state"],
                event=doc["event"],
                expect_seq=doc["expect_seq"],
            )
        except StaleRolloutStateError:
            log.warning(
                "rollout of %s: the registry moved on before the unrecorded %s landed; it follows the registry",
                doc["model"],
                doc["event"]["action"],
            )

    async def _record_pending(self, model: str) -> None:
        """Write the pending decision of ``model`` until the registry takes it (or has moved on past it)."""
        delay = RETRY_MIN_S
        while model in self.pending:
            doc = self.pending[model]
            try:
                await asyncio.to_thread(self._save_pending, doc)
            except Exception as exc:  # noqa: BLE001  (the registry is still away: wait, then try again)
                log.warning(
                    "rollout of %s: recording the %s failed again (%s); next try in %.1f s", model, doc["event"]["action"], exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            self.pending.pop(model, None)
            self.journal.remove(model)
            ro = self.rollouts.get(model)
            if ro is not None:
                ro.state["recorded"] = True
                ro.recorded = True
            await self._release(model)
            log.info("rollout of %s: the %s is recorded in the registry now", model, doc["event"]["action"])

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

    # restart, followers, takeover ------------------------------------------------------------------
    def uses_registry(self) -> bool:
        from modelpress.registry.engine import URL_ENV

        if self.registry_url is None and not os.environ.get(URL_ENV):
            from modelpress.serving.repository import registry_exists

            return registry_exists()
        return True

    async def resume_all(self) -> list[str]:
        """Pick up every rollout the registry says was loading, running or paused for a model served here.

        First the decisions this server made but the registry never recorded (the journal) are
        recorded, so a breached split is never put back; then each active rollout whose lease is
        free (or this server's) is resumed here, and the others are followed. From then on a task
        renews the leases, follows the other servers' rollouts and takes over expired ones.
        """
        if not self.uses_registry():
            return []
        for model, doc in self.journal.read_all().items():
            if model in self.repository.routers and model not in self.pending:
                self._replay(model, doc)
        try:
            resumed = await self.sync_once()
        except Exception:  # a registry that cannot be read leaves nothing to resume; the server still serves
            log.exception("could not read the rollouts to resume from the registry")
            resumed = []
        if self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop(), name="rollout-sync")
        return resumed

    def _replay(self, model: str, doc: dict[str, Any]) -> None:
        """A decision from the journal: its traffic (the baseline alone) is put back first, then it is recorded."""
        state = {k: v for k, v in doc["state"].items() if k != "spec"}
        router = self.repository.routers[model]
        ro = Rollout(self, model, parse_spec(doc["state"]["spec"]), {**state, "recorded": False})
        ro.events = [doc["event"]]
        baseline = str(state.get("baseline"))
        if baseline in router.versions:
            router.set_policy(SinglePolicy(baseline))
            ro.applied = router.policy
        self.rollouts[model] = ro
        self.pending[model] = doc
        log.warning("rollout of %s: replaying the %s the registry never recorded", model, doc["event"].get("action"))
        self._spawn(self._record_pending(model), f"rollout-record-{model}")

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(sync_seconds(self.lease_s))
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the registry may be away for a while: keep serving, look again next time
                log.warning("rollout sync with the registry failed", exc_info=True)

    async def sync_once(self) -> list[str]:
        """Renew the leases held here, follow the rollouts other servers drive, take over those whose lease expired."""
        async with self._sync_lock:
            return await self._sync()

    async def _sync(self) -> list[str]:
        self._forget_unserved()
        self.observations.prune()
        reg = self.registry()
        deployments = await asyncio.to_thread(reg.rollouts.list)
        taken: list[str] = []
        for dep in deployments:
            name, state = dep["name"], dep.get("rollout_state") or {}
            if name not in self.repository.routers or name in self.pending:
                continue  # not served here; or this server's own decision is still to be recorded (safe state meanwhile)
            ro = self.rollouts.get(name)
            ended_here = ro is not None and ro.driving and ro.status not in ACTIVE
            if ended_here and state.get("status") in ACTIVE and state.get("seq", 0) < ro.state.get("seq", 0):
                continue  # read before this server recorded the rollout's end: never resumed from that stale read
            if ro is not None and ro.driving and ro.status in ACTIVE:
                lease = self.leases.get(name)
                renewed = await asyncio.to_thread(reg.leases.renew, lease, self.lease_s) if lease is not None else None
                if renewed is not None:
                    self.leases[name] = renewed
                    continue
                async with ro.lock:
                    self._demote(ro)
            try:
                if state.get("status") in ACTIVE and await self._try_take(name, state, ro):
                    taken.append(name)
                    continue
                await self._follow(name, dep)
            except Exception:  # one model that cannot be followed must not stop the others
                log.exception("could not follow the rollout of %s from the registry", name)
        return taken

    async def _try_take(self, name: str, state: dict[str, Any], ro: Rollout | None) -> bool:
        """Take the lease of an active rollout when it is free, expired or this server's, and drive the rollout from here."""
        leases = self.registry().leases
        held = await asyncio.to_thread(leases.get, name)
        if held is not None and not held.expired() and held.owner != self.owner:
            return False
        lease = await asyncio.to_thread(leases.acquire, name, self.owner, self.lease_s)
        if lease is None:
            return False
        self.leases[name] = lease
        takeover = held is not None and held.owner not in (None, self.owner)
        why = f"the lease of {held.owner} expired; {self.owner} drives it now" if takeover and held else "server restarted"
        try:
            await self._resume_one(name, state, action="takeover" if takeover else "resume", why=why, follower=ro)
        except BaseException:
            await self._release(name)
            raise
        return True

    async def _follow(self, name: str, dep: dict[str, Any]) -> None:
        """Route ``name`` the way the registry says another server's rollout of it routes now."""
        state = dep.get("rollout_state") or {}
        ro = self.rollouts.get(name)
        seen, self._seen_updates[name] = self._seen_updates.get(name), _deployment_mark(dep)
        fresh = ro is None or ro.driving or ro.state.get("started_at") != state.get("started_at")
        if fresh and state.get("status") not in ACTIVE:
            if ro is not None and seen is not None and seen != self._seen_updates[name]:
                await self._follow_change(name, dep, ro)  # e.g. a rollback by hand on another server
            return  # a rollout that ended before this server saw it: what it serves came from the registry already
        if "spec" not in state or "baseline" not in state:
            return
        if fresh or ro is None:
            ro = Rollout(self, name, parse_spec(state["spec"]), {k: v for k, v in state.items() if k != "spec"})
            ro.driving, ro.recorded = False, True
            self.rollouts[name] = ro
        held = await asyncio.to_thread(self.registry().leases.get, name)
        ro.following = held.owner if held is not None and held.owner else None
        if ro.state.get("seq") != state.get("seq") or not ro.events:
            ro.state.clear()
            ro.state.update({k: v for k, v in state.items() if k != "spec"})
            rows = await asyncio.to_thread(self.registry().rollouts.events, name, self.MAX_EVENTS_IN_MEMORY)
            ro.events = [e["decision"] for e in rows]
        recorded = dep.get("traffic_policy")
        if state.get("status") == "loading" or not recorded:
            return  # traffic stays as it is while the candidate loads
        policy = policy_from_json(recorded)
        reg_model = state.get("registry_model")
        for label in sorted(policy.targets()):
            ref = state.get("baseline_ref") if label == ro.baseline else state.get("candidate_ref") or state.get("candidate_source")
            await self.ensure_loaded(name, label, ref or (f"{reg_model}:{label}" if reg_model else None), ro.spec.runtime)
        router = self.repository.routers[name]
        if router.policy is None or router.policy.describe() != policy.describe():
            router.set_policy(policy)
            ro.applied = policy
            log.info("rollout of %s: following %s, traffic %s", name, ro.following or "the registry", policy.describe())
        if ro.status not in ACTIVE:  # what the controller unloaded when it ended (a standby baseline stays)
            gone = ro.baseline if ro.status == "succeeded" else ro.candidate
            if ro.status != "succeeded" or not ro.spec.keep_standby:
                await self.unload(name, gone)

    async def _follow_change(self, name: str, dep: dict[str, Any], ro: Rollout) -> None:
        """A finished rollout's deployment changed since (``rollback`` on another server): route as it records now."""
        state, recorded = dep.get("rollout_state") or {}, dep.get("traffic_policy")
        if not recorded or not dep.get("model"):
            return
        policy = policy_from_json(recorded)
        for label in sorted(policy.targets()):
            await self.ensure_loaded(name, label, f"{dep['model']}:{label}")
        router = self.repository.routers[name]
        if router.policy is not None and router.policy.describe() == policy.describe():
            return
        router.set_policy(policy)
        ro.applied = policy
        ro.state.update({k: state[k] for k in ("status", "reason", "finished_at", "weights", "policy") if k in state})
        log.info("deployment %s: following the registry, traffic %s", name, policy.describe())
        left = state.get("candidate")  # what a rollback by hand moved traffic off
        if isinstance(left, str) and left not in policy.targets():
            await self.unload(name, left)

    async def _resume_one(
        self, name: str, state: dict[str, Any], *, action: str = "resume", why: str = "server restarted", follower: Rollout | None = None
    ) -> None:
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
        ro.recorded = True
        ro.events = [e["decision"] for e in await asyncio.to_thread(self.registry().rollouts.events, name, self.MAX_EVENTS_IN_MEMORY)]
        router = self.repository.routers[name]
        if state["status"] == "loading":
            ro.applied = router.policy
        else:
            policy = policy_from_json(state["policy"]) if state.get("policy") else ro.policy_for_step()
            if follower is not None and router.policy is not None and router.policy.describe() == policy.describe():
                ro.applied = router.policy  # a follower already routes this way: the split is not even reassigned
                ro.window_start = self.clock()
            else:
                await ro.apply(policy)
        self.rollouts[name] = ro
        await self.persist(ro, ro.event(action, reasons=[why]))
        ro.start_task()
        log.info("rollout of %s: %s at step %d (%s)", name, action, state["step"], state.get("weights"))

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


def _deployment_mark(dep: dict[str, Any]) -> str:
    """What a deployment records now, to tell whether it changed since a server last looked: its ``updated_at`` alone
    is kept to the second, and a rollback by hand within the same second as the last change went unseen."""
    keys = ("version", "traffic_policy", "rollout_state", "updated_at")
    return json.dumps({k: dep.get(k) for k in keys}, sort_keys=True, default=str)


__all__ = ["ROLLOUT_USER", "RolloutManager", "RolloutSpec", "parse_spec", "phases_of"]
