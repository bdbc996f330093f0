"""Mixed-precision candidates: a fast quantized candidate that fails the gate only on agreement, tried
again with its most sensitive layers kept in float.

A recipe step does this with ``auto_exclude`` (:func:`modelpress.optimize.search.sensitivity.auto_exclude`,
the step pipeline's ``retry``): keep 1, 2, 4, ... layers in float (the tuner: 1, 2, 3, 4, 6, ...) until the gate passes. The tuner
does not run steps through that retry (it builds, times and scores candidates in its own stages),
so it makes each of those trials a candidate of its own: built and timed like any other, placed in
the search's speed order, screened and scored, cached under its own key (its config names the
layers it keeps), with its own row (``dynamic-int8@onnxruntime(per_channel=True, fuse=True, 4 layers
float)``). Keeping more layers in float costs speed, so the search scores the fastest of them
first and stops at the first that passes, as for every candidate.

A candidate is expanded when:

* it failed the gate (or screening) on agreement metrics only: its primary metric passed, so the
  damage is in a few layers' rounding, which float layers repair; a candidate whose primary metric
  fails is broken more widely;
* it is a post-training quantization (dynamic or static int8, weight-only) on a runtime with a
  layer-sensitivity scan (ONNX Runtime, OpenVINO);
* it is faster than the best candidate already passing (its mixed versions are slower than it);
* the tune's ``auto_exclude`` (or the candidate config's own ``auto_exclude``) is above 0.

The ranking of layers (one sensitivity scan, about a minute on MiniLM) is cached next to the
candidates, by the source's hash and the config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.errors import ModelpressError
from modelpress.optimize.configs import DynamicInt8, StaticInt8, TechniqueConfig, WeightOnly, parse_step
from modelpress.optimize.search.candidates import Candidate
from modelpress.optimize.search.front import STOP_GATE, STOP_SCREEN, Point
from modelpress.optimize.search.tune_cache import _write_json

# The most layers a mixed-precision candidate keeps in float by default (1, 2, 3, 4, 6, 9, 12: seven candidates).
# Measured on MiniLM (24 quantized layers, ORT dynamic int8 per channel, whole STS-B dev split, docs/tune.md):
# top-10 agreement 0.906 (none in float), 0.915, 0.918, 0.930, 0.939 (8) and 0.954 (12, half the layers),
# the first over 0.95.
MAX_LAYERS = 12
RANKING_VERSION = 1  # bump when what a cached ranking means changes


@dataclass
class MixedPrecision(Candidate):
    """``config`` (a quantization) with ``layers`` kept in float, the most sensitive first; ``parent`` the label of the
    candidate it comes from."""

    parent: str = ""
    layers: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return float_label(self.parent, len(self.layers))


def float_label(label: str, k: int) -> str:
    """``label`` with ``k layers float`` among its settings: ``dynamic-int8@onnxruntime(per_channel=True, 4 layers float)``."""
    what = f"{k} layer{'' if k == 1 else 's'} float"
    return f"{label[:-1]}, {what})" if label.endswith(")") else f"{label}({what})"


def layer_counts(k_max: int) -> list[int]:
    """1, 2, 3, 4, 6, 9, ... (each about 1.5x the last) up to ``k_max`` (which is always the last): the trials.

    Steps of 1.5x, not 2x: on MiniLM with OpenVINO static int8 (AVX-512 VNNI, docs/tune.md) 4 layers in float
    reached top-10 agreement 0.9499 at 5.58x and 8 layers 0.960 at 4.94x; the count between them is the one a
    0.95 bar needs, and each count costs one build and timing (the scoring stops at the first that passes)."""
    out, k = [], 1
    while k_max > 0 and k <= k_max:
        out.append(k)
        if k == k_max:
            break
        k = min(max(k + 1, 3 * k // 2), k_max)
    return out


def agreement_only(p: Point, agreement_metrics: tuple[str, ...]) -> bool:
    """``p`` failed the gate (or screening) and every failed threshold is an agreement metric."""
    if p.stop == STOP_GATE:
        verdict = p.gate
    elif p.stop == STOP_SCREEN:
        verdict = (p.screen or {}).get("gate")
    else:
        return False
    failed = [r.get("metric") for r in (verdict or {}).get("rows", []) if not r.get("passed")]
    return bool(failed) and all(m in agreement_metrics for m in failed)


def expandable(p: Point) -> TechniqueConfig | None:
    """The config of ``p`` without its ``auto_exclude`` when ``p`` is a single post-training quantization with a
    layer-sensitivity scan (None otherwise)."""
    from modelpress.optimize.search.sensitivity import SCANNERS

    if p.step is None or p.steps or p.float_layers is not None:
        return None
    try:
        cfg = parse_step(p.step)
    except ModelpressError:
        return None
    if not isinstance(cfg, DynamicInt8 | StaticInt8 | WeightOnly) or cfg.runtime not in SCANNERS:
        return None
    return cfg


def ranking(pipe: Any, cfg: TechniqueConfig, root: Path) -> list[str]:
    """The layers ``cfg`` changes in the pipeline's original, the most sensitive first (cached under ``root``)."""
    from modelpress.optimize.search.sensitivity import RANK_BATCH, RANK_SAMPLES, rank_layers

    original = pipe.original
    key_data = {
        "v": RANKING_VERSION,
        "source": original.content_hash(),
        "step": cfg.to_step(),
        "calibration": [RANK_SAMPLES, RANK_BATCH, str(pipe.data_dir)],
    }
    path = root / f"ranking-{hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:24]}.json"
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, list) and all(isinstance(n, str) for n in cached):
            return cached
    except (OSError, ValueError):
        pass
    advance = pipe.progress(f"ranking the layers of {cfg.label()} by sensitivity", None)
    ranked = rank_layers(original, cfg, pipe.data_dir, threads=pipe.threads)
    advance(1)
    root.mkdir(parents=True, exist_ok=True)
    _write_json(path, ranked)
    return ranked


def candidates_for(
    p: Point, pipe: Any, root: Path, *, max_layers: int, faster_than: float | None, notes: list[str]
) -> list[MixedPrecision]:
    """The mixed-precision candidates of ``p`` (none when it does not qualify: the module docstring), keeping
    1, 2, 3, 4, 6, ... up to ``max_layers`` (or the config's own ``auto_exclude``) of its most sensitive layers in float."""
    cfg = expandable(p)
    if cfg is None or not agreement_only(p, pipe.task.agreement_metrics):
        return []
    k_max = cfg.auto_exclude or max_layers
    if k_max <= 0 or (faster_than is not None and (p.first_speedup or 0.0) <= faster_than):
        return []
    base = type(cfg)(**{**cfg.to_step(), "auto_exclude": 0})
    try:
        ranked = ranking(pipe, base, root)
    except ModelpressError as exc:
        notes.append(f"No mixed-precision candidates of {p.label}: ranking its layers failed ({exc.message}).")
        return []
    return [
        MixedPrecision(base.runtime, base.excluding(ranked[:k]), parent=base.label(), layers=ranked[:k])
        for k in layer_counts(min(k_max, len(ranked)))
    ]
