"""Routers and traffic policies: which loaded version of a model answers a request.

Each served model name has one :class:`Router` holding its loaded versions and one
:class:`TrafficPolicy`. A policy looks at the loaded versions and the request's context and
returns a :class:`Decision`: the version that answers, and (for policies that mirror traffic)
versions that get a copy whose answer the client never waits for.

* :class:`SinglePolicy`: all traffic to one version.
* :class:`SplitPolicy`: weighted A/B. Random (seeded when asked), or sticky: the request's key
  (``RequestContext.key``, else a header such as ``x-user-id``) is hashed to one of
  :data:`BUCKETS` stable buckets, and each version owns a contiguous range of buckets in the
  order the weights are given. A canary listed first keeps its users as its share grows.
* :class:`ShadowPolicy`: the primary answers; a fraction of requests is also sent to a
  candidate by :class:`Mirror`, in a background task started once the primary has answered.
  The candidate's errors and latency are recorded and its outputs compared with the primary's
  (:func:`modelpress.rollout.analysis.agreement`), never delaying or failing the client.

Swapping the policy is one assignment on the event loop, so it is atomic for requests: each
request is routed either before or after it, and a version taken out of the router keeps
serving what it already queued until its batcher drains. Policies round-trip through JSON
(:meth:`TrafficPolicy.describe` and :func:`policy_from_json`), which is how the rollout
controller stores them in the registry.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from modelpress.errors import ConfigError, ModelNotReadyError, UnknownServedModelError

log = logging.getLogger("modelpress.serving")

V = TypeVar("V")  # a loaded version (serving.repository.LoadedVersion); routers do not need to know more
BUCKETS = 10_000  # sticky routing: keys hash to this many buckets (shares in steps of 0.01 %)
DEFAULT_STICKY_HEADER = "x-user-id"
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


def _check_label(label: Any, what: str) -> str:
    text = str(label).strip()
    if not text:
        raise ConfigError(f"The {what} version label is empty.", hint="Name a loaded version, e.g. '2'.")
    return text


class SplitPolicy(TrafficPolicy):
    """Weighted A/B between versions: random, or sticky by a key hashed to a stable bucket.

    ``weights``: version -> share (any non-negative numbers; they are normalised), e.g.
    ``{"2": 5, "1": 95}``. ``sticky``: route by the request key; ``sticky_header``: the header
    holding it when ``RequestContext.key`` is unset (requests without a key are routed at
    random). ``seed``: a seeded random stream (tests, reproducible simulations).
    """

    name = "split"

    def __init__(
        self,
        weights: Mapping[str, float],
        *,
        sticky: bool = False,
        sticky_header: str = DEFAULT_STICKY_HEADER,
        seed: int | None = None,
        salt: str = "",
    ) -> None:
        if not isinstance(weights, Mapping) or not weights:
            raise ConfigError("A split needs at least one version and its weight.", hint="Example: SplitPolicy({'2': 10, '1': 90})")
        clean: dict[str, float] = {}
        for label, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                raise ConfigError(
                    f"The weight of version '{label}' is {w!r}; a weight is a finite number >= 0.", hint="Example: {'2': 10, '1': 90}"
                )
            clean[_check_label(label, "split")] = float(w)
        total = sum(clean.values())
        if total <= 0:
            raise ConfigError(
                f"Every weight of the split {clean} is 0; at least one version must get traffic.", hint="Example: {'2': 10, '1': 90}"
            )
        self._weights = {k: 100.0 * v / total for k, v in clean.items()}
        self.labels = list(self._weights)
        cum, edges = 0.0, []
        for label in self.labels:
            cum += self._weights[label] / 100.0
            edges.append(cum)
        edges[-1] = 1.0 + 1e-12  # rounding never leaves a gap at the top
        self._edges = edges
        self._bucket_edges = [round(e * BUCKETS) for e in edges]
        self.sticky = bool(sticky)
        self.sticky_header = sticky_header.lower()
        self.seed = seed
        self.salt = salt
        self._rng = random.Random(seed)
        self._decisions = {label: Decision(label) for label in self.labels}

    def bucket(self, key: str) -> int:
        """The stable bucket (0 to BUCKETS - 1) of a routing key: the same key, the same bucket, in every process."""
        digest = hashlib.blake2b(f"{self.salt}\x00{key}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % BUCKETS

    def key_of(self, ctx: RequestContext) -> str | None:
        if ctx.key:
            return ctx.key
        value = ctx.headers.get(self.sticky_header) if ctx.headers else None
        return value or None

    def choose(self, versions: Mapping[str, Any], ctx: RequestContext) -> Decision:
        if self.sticky:
            key = self.key_of(ctx)
            if key is not None:
                i = bisect_right(self._bucket_edges, self.bucket(key))
                return self._decisions[self.labels[min(i, len(self.labels) - 1)]]
        i = bisect_right(self._edges, self._rng.random())
        return self._decisions[self.labels[min(i, len(self.labels) - 1)]]

    def targets(self) -> set[str]:
        return {k for k, w in self._weights.items() if w > 0}

    @property
    def main(self) -> str:
        return max(self.labels, key=lambda k: (self._weights[k], -self.labels.index(k)))

    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": self.name, "weights": {k: round(v, 6) for k, v in self._weights.items()}, "sticky": self.sticky}
        if self.sticky:
            out["sticky_header"] = self.sticky_header
        if self.seed is not None:
            out["seed"] = self.seed
        if self.salt:
            out["salt"] = self.salt
        return out


class ShadowPolicy(TrafficPolicy):
    """The primary answers every request; ``fraction`` of them is also mirrored to ``candidate``."""

    name = "shadow"

    def __init__(self, primary: str, candidate: str, fraction: float = 1.0, *, seed: int | None = None) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 < fraction <= 1.0:
            raise ConfigError(
                f"The shadow fraction is {fraction!r}; it is a share of requests in (0, 1].",
                hint="Example: ShadowPolicy('1', '2', fraction=0.25)",
            )
        self.primary, self.candidate = _check_label(primary, "primary"), _check_label(candidate, "shadow candidate")
        if self.primary == self.candidate:
            raise ConfigError(
                f"The shadow candidate is the primary itself (version '{self.primary}').", hint="Mirror to another loaded version."
            )
        self.fraction = float(fraction)
        self.seed = seed
        self._rng = random.Random(seed)
        self._plain = Decision(self.primary)
        self._mirrored = Decision(self.primary, (self.candidate,))

    def choose(self, versions: Mapping[str, Any], ctx: RequestContext) -> Decision:
        if self.fraction >= 1.0 or self._rng.random() < self.fraction:
            return self._mirrored
        return self._plain

    def targets(self) -> set[str]:
        return {self.primary, self.candidate}

    @property
    def main(self) -> str:
        return self.primary

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": self.name, "primary": self.primary, "candidate": self.candidate, "fraction": self.fraction}
        if self.seed is not None:
            out["seed"] = self.seed
        return out


POLICY_EXAMPLE = '{"policy": "split", "weights": {"2": 10, "1": 90}, "sticky": true}'


def policy_from_json(data: Mapping[str, Any]) -> TrafficPolicy:
    """The policy a :meth:`TrafficPolicy.describe` dict describes (what the registry stores)."""
    if not isinstance(data, Mapping) or "policy" not in data:
        raise ConfigError(f"A traffic policy is a JSON object with a 'policy' key, not {data!r}.", hint=f"Example: {POLICY_EXAMPLE}")
    kind = data["policy"]
    try:
        if kind == "single":
            return SinglePolicy(data["version"])
        if kind == "split":
            return SplitPolicy(
                data["weights"],
                sticky=bool(data.get("sticky", False)),
                sticky_header=data.get("sticky_header", DEFAULT_STICKY_HEADER),
                seed=data.get("seed"),
                salt=data.get("salt", ""),
            )
        if kind == "shadow":
            return ShadowPolicy(data["primary"], data["candidate"], data.get("fraction", 1.0), seed=data.get("seed"))
    except KeyError as exc:
        raise ConfigError(f"The {kind} policy {dict(data)} lacks {exc}.", hint=f"Example: {POLICY_EXAMPLE}") from None
    raise ConfigError(f"'{kind}' is not a traffic policy.", hint="Known: single, split, shadow.")


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
        """The version most requests without one go to; None before any policy."""
        if self.policy is None:
            return None
        return self.policy.main

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


class Mirror:
    """Runs mirrored (shadow) copies of requests in background tasks the client never waits for.

    ``send`` only creates tasks; each task decodes the request for the candidate, runs it
    through the candidate's batcher, and records the outcome in ``observations`` (latency,
    error, agreement with the primary's results). At most ``max_inflight`` copies run at once;
    beyond that a copy is dropped and counted (a slow candidate never builds a backlog).
    """

    def __init__(self, observations: Any, max_inflight: int = MAX_SHADOW_INFLIGHT, metrics: Any = None) -> None:
        self.observations = observations
        self.metrics = metrics  # a serving.metrics.Metrics: shadow copies also become Prometheus series
        self.max_inflight = max_inflight
        self.dropped = 0
        self._tasks: set[asyncio.Task] = set()

    def send(self, router: Router, decision: Decision, decode: Callable[[Any], Any], primary: Any, primary_results: list[Any]) -> None:
        for label in decision.mirrors:
            lv = router.versions.get(label)
            if lv is None or len(self._tasks) >= self.max_inflight or not lv.batcher.accepting:
                self.dropped += 1
                self.observations.shadow_dropped(router.name, label)
                if self.metrics is not None:
                    self.metrics.observe_shadow(router.name, label, "dropped")
                continue
            task = asyncio.get_running_loop().create_task(self._shadow(lv, decode, primary, primary_results))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _shadow(self, lv: Any, decode: Callable[[Any], Any], primary: Any, primary_results: list[Any]) -> None:
        from modelpress.rollout.analysis import agreement

        started = time.perf_counter()
        try:
            decoded = decode(lv.handler)
            results, _ = await lv.infer(decoded=decoded)
        except Exception as exc:  # a failing candidate is what shadowing is for: record it, tell no client
            self.observations.shadow(lv.name, lv.version, time.perf_counter() - started, ok=False, error=type(exc).__name__)
            if self.metrics is not None:
                self.metrics.observe_shadow(lv.name, lv.version, "error")
            return
        seconds = time.perf_counter() - started
        try:
            agree = agreement(primary.task, primary_results, results)
        except Exception as exc:  # outputs that cannot be compared (other shapes): record it as disagreement
            log.warning(
                "shadow outputs of %s:%s cannot be compared with %s:%s (%r)", lv.name, lv.version, primary.name, primary.version, exc
            )
            agree = 0.0
        self.observations.shadow(lv.name, lv.version, seconds, ok=True, agreement=agree)
        if self.metrics is not None:
            self.metrics.observe_shadow(lv.name, lv.version, "ok", agree)

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout: float | None = None) -> None:
        """Wait for the mirrored copies in flight (tests; a server closing)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
