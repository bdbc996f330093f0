"""Decisions not recorded yet, leases, restart, followers and takeover: the part of the rollout manager
(:class:`~modelpress.rollout.controller.RolloutManager`) that keeps up with the registry rather than deciding.

A decision the registry could not record (it was away) is applied at once, kept in a journal on disk and retried
until recorded. A server drives a rollout while it holds its lease (``claim``, ``_release``; ``_demote`` when it
loses it). On start a server records what its journal holds, then resumes each active rollout whose lease is free
(or its own) and follows the others; from then on a background sync renews the leases it holds, routes the
rollouts other servers drive the way the registry records them, and takes over a rollout whose lease expired.

A mixin: its methods use the manager's state (``repository``, ``rollouts``, ``leases``, ``pending``, ``journal``)
and its operations (``persist``, ``ensure_loaded``, ``unload``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

from modelpress.errors import RolloutConflictError
from modelpress.rollout.ownership import RETRY_MAX_S, RETRY_MIN_S, sync_seconds
from modelpress.rollout.routing import SinglePolicy, policy_from_json
from modelpress.rollout.spec import ACTIVE, parse_spec
from modelpress.rollout.watch import Rollout

log = logging.getLogger("modelpress.rollout")


class Followers:
    """The manager's registry-following half (see the module docstring)."""

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


def _deployment_mark(dep: dict[str, Any]) -> str:
    """What a deployment records now, to tell whether it changed since a server last looked: its ``updated_at`` alone
    is kept to the second, and a rollback by hand within the same second as the last change went unseen."""
    keys = ("version", "traffic_policy", "rollout_state", "updated_at")
    return json.dumps({k: dep.get(k) for k in keys}, sort_keys=True, default=str)


__all__ = ["Followers"]
