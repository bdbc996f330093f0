"""Routers, the traffic-policy protocol, and mirrored (shadow) copies: the request path's routing.

Each served model name has one :class:`Router` holding its loaded versions and one
:class:`TrafficPolicy`. A policy looks at the loaded versions and the request's context and
returns a :class:`Decision`: the version that answers, and (for policies that mirror traffic)
versions that get a copy whose answer the client never waits for.

The server itself only ever sets a :class:`SinglePolicy` (all traffic to one version). Splits,
shadows and canaries are policies too, made by the rollout package
(:mod:`modelpress.rollout.routing`); the router needs nothing more than this protocol.

Swapping the policy is one assignment on the event loop, so it is atomic for requests: each
request is routed either before or after it, and a version taken out of the router keeps
serving what it already queued until its batcher drains.

:class:`Mirror` runs the mirrored copies a decision asks for, in background tasks started once
the primary has answered, and tells its observers (:class:`MirrorObserver`) what each copy did.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from modelpress.errors import ConfigError, ModelNotReadyError, UnknownServedModelError

log = logging.getLogger("modelpress.serving")

V = TypeVar("V")  # a loaded version (serving.repository.LoadedVersion); routers do not need to know more
MAX_SHADOW_INFLIGHT = 256  # mirrored requests running at once per server; more are dropped (counted), never queued


@dataclass(frozen=True)
class RequestContext:
    """What a policy may look at: request id, protocol, headers (lower-case names), a routing key."""

    request_id: str = ""
    protocol: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    key: str | None = None  # e.g. a user id, for sticky routing


@dataclass(frozen=True)
class Decision:
    """The version that answers, plus versions that get a mirrored copy (none for ``single``)."""

    primary: str
    mirrors: tuple[str, ...] = ()


class TrafficPolicy(ABC):
    """Chooses versions for requests. Subclasses set ``name`` and implement ``choose``."""

    name: ClassVar[str]

    @abstractmethod
    def choose(self, versions: Mapping[str, Any], ctx: RequestContext) -> Decision:
        """The decision for one request, among ``versions`` (label -> loaded version)."""

    @abstractmethod
    def targets(self) -> set[str]:
        """Every version label this policy may send traffic to (they must stay loaded)."""

    @property
    @abstractmethod
    def main(self) -> str:
        """The version most traffic goes to (what metadata reports as the default)."""

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name}

    def weights(self) -> dict[str, float]:
        """Percent of answered traffic per version (mirrors excluded)."""
        return {self.main: 100.0}


def check_label(label: Any, what: str) -> str:
    """A version label as text; an empty one is a :class:`ConfigError`."""
    text = str(label).strip()
    if not text:
        raise ConfigError(f"The {what} version label is empty.", hint="Name a loaded version, e.g. '2'.")
    return text


class SinglePolicy(TrafficPolicy):
    """All traffic to one version."""

    name = "single"

    def __init__(self, version: str) -> None:
        self.version = str(version)
        self._decision = Decision(self.version)

    def choose(self, versions: Mapping[str, Any], ctx: RequestContext) -> Decision:
        return self._decision

    def targets(self) -> set[str]:
        return {self.version}

    @property
    def main(self) -> str:
        return self.version

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "version": self.version}


class Router(Generic[V]):
    """The loaded versions of one model name and the policy that routes between them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.versions: dict[str, V] = {}
        self.policy: TrafficPolicy | None = None

    def add(self, label: str, version: V) -> None:
        self.versions[str(label)] = version

    def remove(self, label: str) -> V:
        label = str(label)
        if label not in self.versions:
            raise UnknownServedModelError(f"Model '{self.name}' has no version '{label}' loaded.", hint=self.versions_hint())
        if self.policy is not None and label in self.policy.targets():
            raise ConfigError(
                f"Version '{label}' of model '{self.name}' still receives traffic ({self.policy.describe()}).",
                hint="Route its traffic to another version first (load another version as the default), or unload the whole model.",
            )
        return self.versions.pop(label)

    def set_policy(self, policy: TrafficPolicy) -> None:
        missing = sorted(policy.targets() - set(self.versions))
        if missing:
            raise ConfigError(
                f"The {policy.name} policy for model '{self.name}' routes to version(s) {', '.join(missing)}, which are not loaded.",
                hint=self.versions_hint(),
            )
        self.policy = policy

    @property
    def default_version(self) -> str | None:
        """The version most requests without one go to; None before any policy."""
        if self.policy is None:
            return None
        return self.policy.main

    def route(self, ctx: RequestContext, version: str | None = None) -> tuple[V, Decision]:
        """The version that answers (``version`` when the client named one) and the decision."""
        if version:
            found = self.versions.get(version)
            if found is None:
                raise UnknownServedModelError(f"Model '{self.name}' has no version '{version}' loaded.", hint=self.versions_hint())
            return found, Decision(version)
        if self.policy is None:
            raise ModelNotReadyError(f"Model '{self.name}' is still loading.", hint="Retry in a moment, or poll /v2/models/{name}/ready.")
        decision = self.policy.choose(self.versions, ctx)
        return self.versions[decision.primary], decision

    def versions_hint(self) -> str:
        have = ", ".join(sorted(self.versions)) or "none"
        example = next(iter(sorted(self.versions)), "1")
        return f"Loaded versions of '{self.name}': {have}. Example: /v2/models/{self.name}/versions/{example}/infer"


class MirrorObserver(Protocol):
    """What :class:`Mirror` tells about each mirrored copy (the rollout package records it)."""

    def dropped(self, model: str, version: str) -> None:
        """A copy for ``model:version`` was not sent (too many in flight, or the version is not taking requests)."""

    def failed(self, candidate: Any, seconds: float, error: BaseException) -> None:
        """The copy raised ``error`` after ``seconds``."""

    def answered(self, primary: Any, primary_results: list[Any], candidate: Any, results: list[Any], seconds: float) -> None:
        """The copy answered ``results`` in ``seconds``; the client got ``primary_results`` from ``primary``."""


class Mirror:
    """Runs mirrored (shadow) copies of requests in background tasks the client never waits for.

    ``send`` only creates tasks; each task decodes the request for the candidate, runs it
    through the candidate's batcher, and tells every observer the outcome. At most
    ``max_inflight`` copies run at once; beyond that a copy is dropped and counted (a slow
    candidate never builds a backlog).
    """

    def __init__(self, max_inflight: int = MAX_SHADOW_INFLIGHT) -> None:
        self.max_inflight = max_inflight
        self.observers: list[MirrorObserver] = []
        self.dropped = 0
        self._tasks: set[asyncio.Task] = set()

    def send(self, router: Router, decision: Decision, decode: Callable[[Any], Any], primary: Any, primary_results: list[Any]) -> None:
        for label in decision.mirrors:
            lv = router.versions.get(label)
            if lv is None or len(self._tasks) >= self.max_inflight or not lv.batcher.accepting:
                self.dropped += 1
                self._tell("dropped", router.name, label)
                continue
            task = asyncio.get_running_loop().create_task(self._shadow(lv, decode, primary, primary_results))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _tell(self, what: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, what)(*args)
            except Exception:  # an observer's bug must not end the copy's task with an unretrieved error
                log.exception("the mirror observer %r failed on %s", observer, what)

    async def _shadow(self, lv: Any, decode: Callable[[Any], Any], primary: Any, primary_results: list[Any]) -> None:
        started = time.perf_counter()
        try:
            decoded = await asyncio.to_thread(decode, lv.handler)  # tokenizing off the event loop, as for the primary
            results, _ = await lv.infer(decoded=decoded)
        except Exception as exc:  # noqa: BLE001  (a failing candidate is what shadowing is for: record it, tell no client)
            self._tell("failed", lv, time.perf_counter() - started, exc)
            return
        self._tell("answered", primary, primary_results, lv, results, time.perf_counter() - started)

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout: float | None = None) -> None:
        """Wait for the mirrored copies in flight (tests; a server closing)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)


__all__ = [
    "MAX_SHADOW_INFLIGHT",
    "Decision",
    "Mirror",
    "MirrorObserver",
    "RequestContext",
    "Router",
    "SinglePolicy",
    "TrafficPolicy",
    "check_label",
]
