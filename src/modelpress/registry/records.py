"""What the registry hands back: :class:`ModelVersion`, :class:`CheckReport`, and metric helpers."""

from __future__ import annotations

import datetime as _dt
import getpass
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelpress.artifacts import Artifact, Manifest
from modelpress.errors import ConfigError

# Names that measure speed or cost rather than quality (anything else is a quality metric).
_SPEED_WORDS = (
    "latency",
    "throughput",
    "qps",
    "rps",
    "per_s",
    "per_sec",
    "/s",
    "_ms",
    "ms_",
    "seconds",
    "_sec",
    "time",
    "size",
    "bytes",
    "memory",
    "mem_",
    "rss",
    "params",
    "flops",
)
_CONTEXT_KEYS = ("dataset", "runtime", "machine", "kind")


def iso(when: _dt.datetime | None) -> str | None:
    if when is None:
        return None
    if when.tzinfo is None:  # SQLite hands back naive datetimes; they were written in UTC
        when = when.replace(tzinfo=_dt.UTC)
    return when.astimezone(_dt.UTC).isoformat(timespec="seconds")


def current_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # pragma: no cover - no user name in a bare container
        return None


def metric_kind(name: str) -> str:
    """'speed' for latency, throughput, size and memory figures, else 'quality'."""
    lower = name.lower()
    return "speed" if any(word in lower for word in _SPEED_WORDS) else "quality"


def normalize_metrics(
    metrics: dict[str, Any] | None,
    *,
    dataset: str | None = None,
    runtime: str | None = None,
    machine: str | None = None,
    kind: str | None = None,
    strict: bool = True,
) -> list[dict[str, Any]]:
    """Turn ``{name: value}`` or ``{name: {"value": v, "dataset": ...}}`` into metric rows.

    Nested dicts without a ``value`` are flattened (``{"latency": {"p50_ms": 3}}`` ->
    ``latency.p50_ms``). With ``strict``, a value that is not a finite number is an error;
    otherwise it is skipped (manifests may hold strings and lists).
    """
    if metrics is None:
        return []
    if not isinstance(metrics, dict):
        raise ConfigError(
            f"Metrics must be a dict of name -> number, not {type(metrics).__name__}.",
            hint="Example: {'spearman': 0.84, 'latency_ms': 3.1}",
        )
    if kind is not None and kind not in ("quality", "speed"):
        raise ConfigError(
            f"'{kind}' is not a metric kind.", hint="Use kind='quality' or kind='speed' (or leave it out to infer it from the name)."
        )
    rows: list[dict[str, Any]] = []

    def add(name: str, value: Any, ctx: dict[str, Any]) -> None:
        if isinstance(value, dict) and "value" in value:
            unknown = set(value) - {"value", *_CONTEXT_KEYS}
            if unknown and strict:
                raise ConfigError(
                    f"Metric '{name}' has unknown keys {sorted(unknown)}.", hint=f"Allowed: value, {', '.join(_CONTEXT_KEYS)}."
                )
            add(name, value["value"], {**ctx, **{k: value[k] for k in _CONTEXT_KEYS if value.get(k) is not None}})
            return
        if isinstance(value, dict):
            for key, sub in value.items():
                add(f"{name}.{key}", sub, ctx)
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            if strict:
                raise ConfigError(
                    f"Metric '{name}' has the value {value!r}; a metric is a finite number.", hint="Example: {'spearman': 0.84}"
                )
            return
        if not name or len(name) > 128:
            if strict:
                raise ConfigError(f"The metric name '{name[:40]}' must have 1 to 128 characters.")
            return
        row_kind = ctx.get("kind") or metric_kind(name)
        if row_kind not in ("quality", "speed"):
            if strict:
                raise ConfigError(f"Metric '{name}' has the kind '{row_kind}'.", hint="Use 'quality' or 'speed'.")
            return
        rows.append(
            {
                "name": name,
                "value": float(value),
                "kind": row_kind,
                "dataset": _short(ctx.get("dataset"), 256),
                "runtime": _short(ctx.get("runtime"), 64),
                "machine": _short(ctx.get("machine"), 256),
            }
        )

    base = {"dataset": dataset, "runtime": runtime, "machine": machine, "kind": kind}
    for name, value in metrics.items():
        add(str(name), value, base)
    return rows


def _short(value: Any, limit: int) -> str | None:
    return None if value is None else str(value)[:limit]


def latest_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The last recorded value of each metric name (rows in recording order)."""
    out: dict[str, float] = {}
    for row in rows:
        out[row["name"]] = row["value"]
    return out


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: where its files are, how it was made, how it measures, its stage."""

    name: str
    version: int
    stage: str
    content_hash: str
    path: Path  # the stored folder; read it, never write it
    task: str
    format: str
    model_file: str | None
    size_bytes: int
    created_at: str | None
    created_by: str | None
    parents: list[str] = field(default_factory=list)  # refs, NAME:VERSION
    step: str | None = None
    config: dict[str, Any] | None = None
    tags: list[str] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    stage_history: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)  # this version's manifest
    reused: bool = False  # True when register(..., reuse=True) returned this existing version

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def parent(self) -> str | None:
        return self.parents[0] if self.parents else None

    def metric(self, name: str) -> float | None:
        """The latest value recorded for a metric, or None."""
        return latest_metrics(self.metrics).get(name)

    def artifact(self) -> Artifact:
        """The stored artifact with this version's manifest (run or evaluate it; never write into its folder).

        Versions that share files share one folder, whose ``modelpress.json`` is the first
        registrant's; this returns the manifest of this version (its own task config, runtime
        options and step), so prefer it to ``Artifact.open(version.path)``.
        """
        if not self.manifest:
            return Artifact.open(self.path)
        return Artifact(Manifest.model_validate(self.manifest), self.path)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["ref"] = self.ref
        return data

    def __repr__(self) -> str:
        return (
            f"ModelVersion({self.ref!r}, stage={self.stage!r}, task={self.task!r}, format={self.format!r}, hash={self.content_hash[:12]!r})"
        )


@dataclass
class CheckReport:
    """What :meth:`Registry.check` found. ``ok`` is true when nothing needs attention."""

    artifacts_checked: int = 0
    versions_checked: int = 0
    corrupt: list[dict[str, Any]] = field(default_factory=list)  # {"content_hash", "versions", "files"}
    missing: list[dict[str, Any]] = field(default_factory=list)  # {"content_hash", "versions"}
    orphans: list[str] = field(default_factory=list)  # folders in the store with no database row
    temps: list[str] = field(default_factory=list)  # temporary folders left by interrupted copies
    removed: list[str] = field(default_factory=list)  # what repair removed

    @property
    def ok(self) -> bool:
        leftover = [p for p in self.orphans + self.temps if p not in self.removed]
        return not (self.corrupt or self.missing or leftover)

    @property
    def damaged_versions(self) -> list[str]:
        return sorted({ref for item in self.corrupt + self.missing for ref in item["versions"]})

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["damaged_versions"] = self.damaged_versions
        return data
