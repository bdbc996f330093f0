"""Routers and traffic policies: which loaded version of a model answers a request.

Each served model name has one :class:`Router` holding its loaded versions and one
:class:`TrafficPolicy`. A policy looks at the loaded versions and the request's context and
returns a :class:`Decision`: the version that answers, and (for policies that mirror traffic)
versions that get a copy whose answer the client never waits for. Only ``single`` exists now;
weighted splits, sticky A/B and shadowing are further policies behind the same two methods.

Swapping the policy is one assignment on the event loop, so it is atomic for requests: each
request is routed either before or after it, and a version taken out of the router keeps
serving what it already queued until its batcher drains.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from ..errors import ConfigError, ModelNotReadyError, UnknownServedModelError

V = TypeVar("V")  # a loaded version (serving.repository.LoadedVersion); routers do not need to know more


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

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name}


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
            raise UnknownServedModelError(f"Model '{self.name}' has no version '{label}' loaded.", hint=self._versions_hint())
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
                hint=self._versions_hint(),
            )
        self.policy = policy

    @property
    def default_version(self) -> str | None:
        """The version a request without one goes to (for ``single``); None before any policy."""
        if self.policy is None:
            return None
        return self.policy.choose(self.versions, RequestContext()).primary

    def route(self, ctx: RequestContext, version: str | None = None) -> tuple[V, Decision]:
        """The version that answers (``version`` when the client named one) and the decision."""
        if version:
            found = self.versions.get(version)
            if found is None:
                raise UnknownServedModelError(f"Model '{self.name}' has no version '{version}' loaded.", hint=self._versions_hint())
            return found, Decision(version)
        if self.policy is None:
            raise ModelNotReadyError(f"Model '{self.name}' is still loading.", hint="Retry in a moment, or poll /v2/models/{name}/ready.")
        decision = self.policy.choose(self.versions, ctx)
        return self.versions[decision.primary], decision

    def _versions_hint(self) -> str:
        have = ", ".join(sorted(self.versions)) or "none"
        return f"Loaded versions of '{self.name}': {have}. Example: /v2/models/{self.name}/versions/{next(iter(sorted(self.versions)), '1')}/infer"
