"""``modelpress ship``: optimize (or tune) with the gate, register, shadow, canary, promote or roll back.

    modelpress ship minilm --from minilm --recipe recipe.yaml --steps 5,25,50,100 --window 60s \\
        --url http://127.0.0.1:8000 --api-key "$KEY"

1. the recipe (``--recipe``) or the tuner (``--tune``, within ``--budget``) runs with the quality
   gate (``--max-drop``); the original and every shipped variant are registered under NAME. A
   failed step stops here: nothing reaches the server.
2. when NAME has no production version yet, the registered original becomes production.
3. the server is made to serve NAME's production version (KServe v2 repository extension:
   ``POST /v2/repository/models/NAME/load``) unless it does already.
4. a ``shadow-then-canary`` rollout of the new version starts (``POST /rollouts/NAME/start``);
   its status is followed and every decision printed until it promotes (exit 0) or rolls back
   (non-zero). The server's registry must be the one ship registers in (``--registry``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.errors import ConfigError, GateFailedError, ModelpressRuntimeError, RolloutNotFoundError
from modelpress.rollout.client import DEFAULT_URL, call

EXIT_ROLLED_BACK = 5  # the rollout rolled back or was aborted (the gate's own failure exits 4)
MAX_POLL_S = 1.0  # follow the rollout at least this often (a quarter window when windows are short)
# How long to follow a rollout: windows are extended while the candidate has too few requests, so
# allow this many times the planned duration before giving up (the rollout keeps running then).
FOLLOW_SLACK = 20.0
FOLLOW_EXTRA_S = 60.0


@dataclass
class ShipResult:
    """What ``ship`` did: the registry refs, the rollout's end, every decision it printed."""

    name: str
    status: str  # promoted, rolled_back, aborted, unchanged
    baseline_ref: str | None
    candidate_ref: str | None
    candidate_runtime: str | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    optimization: dict[str, Any] = field(default_factory=dict)
    rollout: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("promoted", "unchanged")

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


def _optimize(name: str, source: Any, recipe: Any, tune: bool, options: dict[str, Any]) -> tuple[str, str, str, dict[str, Any]]:
    """(original ref, candidate ref, candidate runtime, report) or GateFailedError."""
    from modelpress.optimize.api import optimize
    from modelpress.optimize.api import tune as run_tune

    if tune:
        res = run_tune(source, name=name, register=True, **options)
        chosen = res.chosen
        if chosen is None or not chosen.registered or chosen.step is None:
            raise GateFailedError(
                f"The tuner found no variant of '{name}' faster than the original that passes the gate; nothing to ship.",
                hint="Allow a larger drop (--max-drop 2%), a longer --budget, or ship a recipe (--recipe recipe.yaml).",
            )
        return str(res.registered_original), chosen.registered, chosen.runtime, res.to_json()
    options.pop("budget_s", None)
    res = optimize(source, recipe, options.pop("output"), name=name, register=True, overwrite=True, **options)
    failed = res.failed
    if failed or res.final is None or not res.final.registered:
        first = failed[0] if failed else None
        if first is None:
            why = "no step shipped a variant"
        elif first.error:
            why = first.error
        else:
            why = "; ".join(str(r.reason) for r in first.gate.failures) if first.gate else "it was not shipped"
        raise GateFailedError(
            f"Step {first.index if first else 0} ({first.label if first else '-'}) of the recipe failed: {why}. "
            "Stopping before any rollout.",
            hint="Read the gate table (modelpress optimize prints it), loosen the gate or change the step, and ship again.",
        )
    return str(res.registered_original), res.final.registered, res.final.runtime, res.to_json()


@dataclass
class Production:
    ref: str
    version: str


def _production(registry: Any, name: str, original_ref: str) -> Production:
    """NAME's production version; the original becomes production when there is none."""
    from modelpress.errors import RegistryNotFoundError
    from modelpress.registry.api import Registry

    with Registry(registry) as reg:
        try:
            mv = reg.get(f"{name}@production")
        except RegistryNotFoundError:
            mv = reg.promote(
                original_ref, "production", who="modelpress-ship", why="first ship: the original serves while its variant is rolled out"
            )
        return Production(mv.ref, str(mv.version))


def ensure_served(name: str, production: Production, url: str, api_key: str | None) -> None:
    """Make the server serve ``production`` as NAME, loading it (repository extension) unless it does already.

    The server loads it on the runtime its manifest records.
    """
    label = production.version
    try:
        meta = call("GET", url, f"/v2/models/{name}", api_key)
        if label in [str(v) for v in meta.get("versions") or []]:
            return
    except RolloutNotFoundError:  # 404: not served
        pass
    params = {"source": f"{name}@production", "version": label}
    call("POST", url, f"/v2/repository/models/{name}/load", api_key, {"parameters": params})


def _planned_s(spec: dict[str, Any]) -> float:
    windows = len(spec.get("steps") or [5, 25, 50, 100]) + int(spec.get("shadow_windows", 1)) + 1
    return windows * float(spec["window_s"])


def follow(
    name: str, url: str, api_key: str | None, *, timeout_s: float, poll_s: float, on_event: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Poll the rollout's status until it ends; ``on_event`` gets every new decision once."""
    seen: set[Any] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        doc = call("GET", url, f"/rollouts/{name}", api_key)
        for e in doc.get("events") or []:
            key = e.get("seq", (e.get("at"), e.get("action")))
            if key not in seen:
                seen.add(key)
                on_event(e)
        if doc.get("status") not in ("loading", "running", "paused"):
            return doc
        if time.monotonic() > deadline:
            raise ModelpressRuntimeError(
                f"The rollout of '{name}' is still {doc.get('status')} after {timeout_s:.0f} s (phase {doc.get('phase')}); "
                "it keeps running on the server.",
                hint="Windows wait for --min-requests candidate requests: send traffic, "
                f"or follow it with: modelpress rollout status {name}",
            )
        time.sleep(poll_s)


def name_and_source(name: str, source: str | None) -> tuple[str, str]:
    """(served name, model to optimize) from ship's arguments: NAME may be a model folder (then it is the source
    and its folder name the served name, unless ``--from`` names another source)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve().name, source or str(path)
    if source is None:
        raise ConfigError(
            f"'{name}' is not a model folder, so ship needs the model to optimize.",
            hint=f"Example: modelpress ship {name} --from path/to/model --recipe recipe.yaml",
        )
    return name, source


def describe_event(e: dict[str, Any]) -> str:
    weights = ", ".join(f"{k}: {w:g}%" for k, w in (e.get("weights") or {}).items())
    reasons = "; ".join(e.get("reasons") or [])
    return f"{str(e.get('at', ''))[11:19]} {e.get('action')}" + (f" [{weights}]" if weights else "") + (f": {reasons}" if reasons else "")


def ship(
    name: str,
    source: Any,
    *,
    recipe: Any = None,
    tune: bool = False,
    max_drop: float = 0.01,
    budget_s: float = 300.0,
    steps: list[float] | None = None,
    window_s: float = 60.0,
    url: str = DEFAULT_URL,
    api_key: str | None = None,
    registry: str | None = None,
    output: str | os.PathLike | None = None,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    task: str | None = None,
    limit: int | None = None,
    threads: int | None = None,
    rollout: dict[str, Any] | None = None,
    timeout_s: float | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> ShipResult:
    """Optimize ``source`` with the gate, register it as NAME, and roll it out shadow-then-canary.

    ``recipe`` (a Recipe, dict or file) or ``tune=True``. ``rollout``: more rollout fields
    (``max_error_rate``, ``max_p99_ratio``, ``min_agreement``, ``min_requests``, ``shadow_windows``, ...).
    Raises :class:`GateFailedError` when a step (or every tuner candidate) breaks the gate; returns
    a :class:`ShipResult` whose ``ok`` says whether the candidate was promoted.
    """
    if (recipe is None) == (not tune):
        raise ConfigError(
            "Give exactly one of a recipe or the tuner.",
            hint="Example: modelpress ship minilm --from minilm --recipe recipe.yaml (or --tune --budget 5m)",
        )
    options: dict[str, Any] = {
        "max_drop": max_drop,
        "budget_s": budget_s,
        "data": data,
        "data_dir": data_dir,
        "task": task,
        "limit": limit,
        "threads": threads,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if registry is not None:
        from modelpress.optimize.registering import open_registry

        options["registry"] = open_registry(registry)
    options["output"] = Path(output) if output is not None else Path("out") / "ship" / name
    try:
        original_ref, candidate_ref, runtime, report = _optimize(name, source, recipe, tune, options)
    finally:
        if "registry" in options:
            options["registry"].close()
    production = _production(registry, name, original_ref)
    result = ShipResult(name, "unchanged", production.ref, candidate_ref, runtime, optimization=report)
    if candidate_ref == production.ref:
        return result
    ensure_served(name, production, url, api_key)
    spec: dict[str, Any] = {
        "candidate": candidate_ref.split(":")[-1],
        # from the registry ship registered it in, even when the server serves NAME from a folder it was started with
        "source": candidate_ref,
        "strategy": "shadow-then-canary",
        "window_s": window_s,  # the server loads the candidate on the runtime its manifest records
        **(rollout or {}),
    }
    if steps is not None:
        spec["steps"] = steps
    say = on_event or (lambda _e: None)

    def record(e: dict[str, Any]) -> None:
        result.decisions.append(e)
        say(e)

    call("POST", url, f"/rollouts/{name}/start", api_key, spec)
    poll_s = min(MAX_POLL_S, window_s / 4)
    doc = follow(
        name, url, api_key, timeout_s=timeout_s or FOLLOW_SLACK * _planned_s(spec) + FOLLOW_EXTRA_S, poll_s=poll_s, on_event=record
    )
    result.rollout = doc
    result.status = {"succeeded": "promoted"}.get(doc.get("status", ""), str(doc.get("status")))
    return result


def serve_foreground(source: str, runtime: str | None, name: str, *, port: int = 8000, announce: Callable[[str], None] = print) -> None:
    """Serve one model (a registry ref or folder) on 127.0.0.1 until Ctrl-C, printing its dashboard and model URLs.

    ``runtime``: None runs it on the runtime its manifest records.
    """
    from modelpress.rollout import serve
    from modelpress.serving.config import ServerConfig

    cfg = ServerConfig.from_models([source], runtime=runtime, name=name).model_copy(update={"port": port})
    base = f"http://127.0.0.1:{port}"
    on = f" ({runtime})" if runtime else ""
    announce(f"serving {source}{on} as {name}: dashboard {base}/dashboard, model {base}/v2/models/{name} (Ctrl-C to stop)")
    try:
        serve(cfg)
    except KeyboardInterrupt:  # Ctrl-C is how this ends: in-flight requests have finished by now
        announce("stopped")


__all__ = ["ShipResult", "ensure_served", "follow", "name_and_source", "serve_foreground", "ship"]
