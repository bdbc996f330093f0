"""The live dashboard: ``GET /dashboard`` (one HTML page and one script, no build step) and the
JSON it polls, ``GET /dashboard/data``.

Per model and version the page shows request rate, error rate, p50 and p99 latency over time
(SVG line charts drawn by ``dashboard.js``), the current traffic split, shadow agreement, and
the rollout's phase, step and decisions; for a causal LM also its engine's running and waiting
sequences, KV cache use, tokens/s, time to first token and inter-token latency (p50, p99). ``?interval=MS`` sets how often it polls (default
1000), ``?span=S`` how many seconds of history it shows (default 300). Like ``/metrics`` it
needs no key; it shows numbers, never request contents.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from modelpress.errors import InvalidInputError
from modelpress.rollout.observations import check_series
from modelpress.serving.http import json_response

router = APIRouter(tags=["Observability"])
MAX_SPAN_S = 3600.0  # at most an hour of history per poll (the records kept are bounded anyway)
MAX_POINTS = 600  # buckets per series: the bucket widens for long spans


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


@router.get("/dashboard", summary="Live dashboard (HTML)", include_in_schema=True)
async def page() -> Response:
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers={"cache-control": "no-store"})


@router.get("/dashboard/dashboard.js", summary="The dashboard's script", include_in_schema=False)
async def script() -> Response:
    return Response(_asset("dashboard.js"), media_type="text/javascript; charset=utf-8", headers={"cache-control": "no-store"})


def _number(raw: str | None, default: float, name: str, low: float, high: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidInputError(
            f"{name}={raw!r} is not a number between {low:g} and {high:g}.", hint=f"Example: /dashboard/data?{name}={default:g}"
        )
    return value


def dashboard_data(extension: Any, span_s: float = 300.0, bucket_s: float | None = None) -> dict[str, Any]:
    """What the page draws: per model its policy, split and rollout, per version totals and series.

    ``extension``: the server's :class:`~modelpress.rollout.extension.RolloutExtension`.
    """
    import time

    bucket = bucket_s or max(1.0, span_s / MAX_POINTS)
    check_series(span_s, bucket)  # a tiny bucket over a long span: 400, before any work
    obs = extension.observations
    repository = extension.server.repository
    since = obs.clock() - span_s
    rollouts = extension.rollouts.describe_all()
    models = []
    for name in repository.names():
        router_ = repository.routers[name]
        policy = router_.policy
        labels = sorted(set(router_.versions) | set(obs.versions_of(name)), key=lambda v: (len(v), v))
        versions = []
        for label in labels:
            lv = router_.versions.get(label)
            entry: dict[str, Any] = {
                "version": label,
                "loaded": lv is not None,
                "task": lv.task if lv is not None else None,
                "runtime": lv.runtime if lv is not None else None,
                "registry_ref": lv.registry_ref if lv is not None else None,
                "totals": obs.window(name, label, since).to_json(),
                "series": obs.timeseries(name, label, span_s=span_s, bucket_s=bucket),
            }
            summary = getattr(lv.handler, "summary", None) if lv is not None else None
            if summary is not None:  # a causal LM: its engine's batch, queue, KV cache, tokens/s and latencies
                entry["llm"] = summary()
            shadow = obs.shadow_window(name, label, since)
            if shadow.n:
                entry["shadow"] = shadow.to_json() | {"dropped": obs.dropped.get((name, label), 0)}
                entry["shadow_series"] = obs.timeseries(name, label, span_s=span_s, bucket_s=bucket, shadow=True)
            versions.append(entry)
        desc = policy.describe() if policy is not None else None
        models.append(
            {
                "name": name,
                "policy": desc,
                "weights": policy.weights() if policy is not None else {},
                "shadow": {desc["candidate"]: desc["fraction"]} if desc and desc.get("policy") == "shadow" else {},
                "versions": versions,
                "rollout": rollouts.get(name),
            }
        )
    return {"now": time.time(), "span_s": span_s, "bucket_s": bucket, "models": models}


_DATA_QUERY = {
    "parameters": [
        {"name": "span", "in": "query", "required": False, "schema": {"type": "number", "minimum": 1.0, "maximum": MAX_SPAN_S}},
        {"name": "bucket", "in": "query", "required": False, "schema": {"type": "number", "minimum": 0.1, "maximum": MAX_SPAN_S}},
    ]
}  # the query the handler reads itself (so that a bad value is a 400 naming an example), as the schema shows it


@router.get("/dashboard/data", summary="The numbers the dashboard draws (JSON)", openapi_extra=_DATA_QUERY)
async def data(request: Request) -> Response:
    span = _number(request.query_params.get("span"), 300.0, "span", 1.0, MAX_SPAN_S)
    bucket = request.query_params.get("bucket")
    bucket_s = _number(bucket, 1.0, "bucket", 0.1, MAX_SPAN_S) if bucket is not None else None
    return json_response(dashboard_data(request.app.state.rollouts, span, bucket_s), headers={"cache-control": "no-store"})
