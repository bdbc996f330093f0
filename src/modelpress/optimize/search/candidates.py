"""The tuner's candidates: the baseline, the hardware preset's configs, the peers' recipes, the runtimes.

A :class:`Candidate` is one point to try: a technique config on its runtime, or the model as it is
on a runtime. :func:`default_candidates` lists them best bet first; :func:`parse_candidates` reads
them from data (a runtime name, a technique step, or ``{steps: [first, second]}`` for a compound
candidate, :mod:`modelpress.optimize.search.compound`; a ``qat`` step is a compound candidate too:
it trains).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from modelpress.errors import ConfigError
from modelpress.optimize.configs import DynamicInt8, Precision, TechniqueConfig, WeightOnly, parse_step
from modelpress.optimize.configs.distill import Distill
from modelpress.optimize.configs.prune import StructuredPrune
from modelpress.optimize.configs.quantize import QAT

BASELINE_RUNTIME = "torch"
# Quantizing a trained model, timing it and scoring it: what a compound candidate costs beyond its training.
COMPOUND_OVERHEAD_S = 180.0


@dataclass
class Candidate:
    """One point to try: a technique config, or (config None) the model as it is on a runtime."""

    runtime: str
    config: TechniqueConfig | None = None
    peer: str | None = None  # the peer recipe this reproduces ("Optimum's default", ...)

    @property
    def label(self) -> str:
        return self.config.label() if self.config is not None else f"fp32@{self.runtime}"

    def key_data(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "step": self.config.to_step() if self.config is not None else None}


# The peers' default recipes (PEERS.md), as modelpress configs, so they are measured in the same run.
def peer_candidates(task: str) -> list[Candidate]:
    from modelpress.optimize.search.presets import nncf_static_int8

    text = task in ("embedding", "text-classification")
    peers = [
        Candidate(
            "onnxruntime",
            DynamicInt8(runtime="onnxruntime", per_channel=False, fuse=False),
            "Optimum/ORT dynamic int8 (default, per-tensor)",
        ),
        Candidate("torch", Precision(runtime="torch", dtype="bf16", compile=True), "torch.compile bf16 + freezing"),
        Candidate("openvino", Precision(runtime="openvino", dtype="bf16"), "OpenVINO bf16"),
        # OpenVINO runs bf16 by default on this kind of CPU; our runner asks for f32 unless told, so
        # the peers' OpenVINO recipes carry the bf16 hint they get implicitly.
        Candidate("openvino", nncf_static_int8("bf16"), "OpenVINO + NNCF static int8"),
        Candidate("openvino", WeightOnly(runtime="openvino", bits=8, precision_hint="bf16"), "OpenVINO NNCF int8 weight-only"),
        Candidate("torch", DynamicInt8(runtime="torch", compile=True), "torchao int8 dynamic + compile"),
    ]
    if text:
        peers.insert(
            1,
            Candidate(
                "onnxruntime", DynamicInt8(runtime="onnxruntime", per_channel=True, fuse=True), "ORT dynamic int8 per-channel, fused"
            ),
        )
    return peers


def default_candidates(task: str, preset: str | None = None, runtimes: list[str] | None = None) -> list[Candidate]:
    """The baseline, the preset's configs (its best guesses first), the peers' recipes, then the
    other runtimes unoptimized (duplicates removed): the likeliest winners are tried first, so a
    short budget still finds them."""
    from modelpress.optimize.search.presets import detect_preset, expand_preset

    cands = [Candidate(BASELINE_RUNTIME)]
    cands += [Candidate(cfg.runtime, cfg) for cfg in expand_preset(preset or detect_preset(), task)]
    if task == "causal-lm":  # every candidate must run on a generation engine (timed decoding): the float decoder too
        return [c for c in [*cands, Candidate("openvino-decoder")] if not runtimes or c.runtime in runtimes]
    peers = peer_candidates(task)
    for c in cands:  # a preset config that is also a peer's recipe is marked as that peer
        for peer in peers:
            if c.config is not None and peer.key_data() == c.key_data():
                c.peer = peer.peer
    cands += [*peers, Candidate("openvino"), Candidate("onnxruntime")]
    seen: set[str] = set()
    unique = []
    for c in cands:
        key = json.dumps(c.key_data(), sort_keys=True)
        if key in seen or (runtimes and c.runtime not in runtimes):
            continue
        seen.add(key)
        unique.append(c)
    return unique


def parse_candidates(items: list[Any]) -> list[Candidate]:
    """Candidates from data: a runtime name (the model as it is), a technique step, or a compound
    candidate ``{"steps": [first, second]}`` (:func:`parse_compound`)."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Candidate):
            out.append(item)
        elif isinstance(item, dict) and "steps" in item:
            out.append(parse_compound(item, where=f"candidate {i + 1}"))
        elif isinstance(item, str) and item in ("torch", "onnxruntime", "openvino", "openvino-decoder"):
            out.append(Candidate(item))
        else:
            cfg = parse_step(item, where=f"candidate {i + 1}")
            # QAT trains for minutes: built with the compound candidates, under the same budget rule
            out.append(Compound(cfg.runtime, cfg, family="qat") if isinstance(cfg, QAT) else Candidate(cfg.runtime, cfg))
    return out


@dataclass
class Compound(Candidate):
    """Two steps chained: ``first`` (distill or structured-prune, trained) then ``config`` (a quantization).

    Or (family ``qat``, ``first`` None) one trained step, ``config`` a :class:`QAT` step: fine-tuning with
    the quantization simulated, then that quantization (its ``steps()``: the QAT step, then the
    post-training step it converts with)."""

    first: TechniqueConfig | None = None
    family: str = ""  # "distill", "prune", "llm-prune", "qat": which of the compound module docstring's kinds

    @property
    def label(self) -> str:
        if self.first is None and self.config is not None:  # QAT: one step that trains
            return self.config.label()
        first = self.first.label() if self.first is not None else "?"
        second = self.config.label() if self.config is not None else f"fp32@{self.runtime}"
        return f"{first} -> {second}"

    def key_data(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "steps": self.steps()}

    def steps(self) -> list[dict[str, Any]]:
        if self.first is None and isinstance(self.config, QAT):
            return [self.config.to_step(), self.config.target().to_step()]  # the QAT step, then what it converts with
        return [c.to_step() for c in (self.first, self.config) if c is not None]

    @property
    def train_s(self) -> float:
        """The trained step's budget (seconds): what makes a compound candidate expensive."""
        trained = self.first if self.first is not None else self.config  # a QAT candidate trains in its only step
        spec = getattr(trained, "training", None) or getattr(trained, "finetune", None)
        if spec is None:
            return 0.0
        return float(spec.max_seconds if spec.max_seconds is not None else spec.max_steps)  # no time bound: about a second a step

    @property
    def needs_s(self) -> float:
        """The shortest ``--budget`` under which it is built: its training plus quantizing, timing and scoring, in whole minutes."""
        return 60.0 * math.ceil((self.train_s + COMPOUND_OVERHEAD_S) / 60.0)


def parse_compound(item: dict[str, Any], where: str = "candidate") -> Compound:
    """``{"steps": [first, second]}``: a first step that makes a smaller model, then a quantization."""
    steps = item.get("steps")
    extra = set(item) - {"steps"}
    if not isinstance(steps, list) or len(steps) != 2 or extra:
        raise ConfigError(
            f"{where}: a compound candidate has exactly two steps and nothing else, got {item!r}.",
            hint="Example: {steps: [{technique: distill, layers: 4}, {technique: dynamic-int8, runtime: onnxruntime}]}",
        )
    first, second = (parse_step(s, where=f"{where}, step {n}") for n, s in ((1, steps[0]), (2, steps[1])))
    if not isinstance(first, (Distill, StructuredPrune)):
        raise ConfigError(
            f"{where}: a compound candidate's first step makes a smaller model (distill or structured-prune), got {first.label()}.",
            hint="Example: {steps: [{technique: structured-prune, ratio: 0.5, finetune: {max_seconds: 300}}, {technique: static-int8}]}",
        )
    family = "distill" if isinstance(first, Distill) else "prune"
    return Compound(second.runtime, second, first=first, family=family)
