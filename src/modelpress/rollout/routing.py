"""The rollout's traffic policies: weighted and sticky splits, shadows, and their JSON form.

The router, the request context and the ``single`` policy are the server's
(:mod:`modelpress.serving.routing`); a rollout steers a router with the policies here:

* :class:`SplitPolicy`: weighted A/B. Random (seeded when asked), or sticky: the request's key
  (``RequestContext.key``, else a header such as ``x-user-id``) is hashed to one of
  :data:`BUCKETS` stable buckets, and each version owns a contiguous range of buckets in the
  order the weights are given. A canary listed first keeps its users as its share grows.
* :class:`ShadowPolicy`: the primary answers; a fraction of requests is also sent to a
  candidate by the server's :class:`~modelpress.serving.routing.Mirror`, in a background task
  started once the primary has answered. The candidate's errors and latency are recorded and its
  outputs compared with the primary's (:class:`modelpress.rollout.shadow.ShadowRecorder`), never
  delaying or failing the client.

Policies round-trip through JSON (:meth:`TrafficPolicy.describe` and :func:`policy_from_json`),
which is how the rollout controller stores them in the registry.
"""

from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_right
from collections.abc import Mapping
from typing import Any

from modelpress.errors import ConfigError
from modelpress.serving.routing import Decision, RequestContext, Router, SinglePolicy, TrafficPolicy, check_label

BUCKETS = 10_000  # sticky routing: keys hash to this many buckets (shares in steps of 0.01 %)
DEFAULT_STICKY_HEADER = "x-user-id"


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
            clean[check_label(label, "split")] = float(w)
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
        self.primary, self.candidate = check_label(primary, "primary"), check_label(candidate, "shadow candidate")
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


__all__ = [
    "BUCKETS",
    "DEFAULT_STICKY_HEADER",
    "Decision",
    "RequestContext",
    "Router",
    "ShadowPolicy",
    "SinglePolicy",
    "SplitPolicy",
    "TrafficPolicy",
    "policy_from_json",
]
