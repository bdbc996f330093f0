"""Layer sensitivity: how much each layer alone suffers from a technique.

For each layer, the technique is applied to that layer ONLY (every other layer excluded), the
float and the quantized models run on the same batches, and the damage to the main output is
scored: ``1 - mean cosine`` (default; per sample, padding masked out) or the SQNR in dB
(torchao's ``compute_error``). The worst layers come first, ready for
``config.excluding(names[:k])``, which the recipe's ``auto_exclude`` retries with.

The float outputs are computed once. Layers are limited to the ones doing the arithmetic
(MatMul, Gemm, Conv, fused Attention; embeddings are not scanned). On ONNX Runtime the model is
quantized once and each layer's quantized nodes are spliced into the float graph
(:func:`splice`), so each layer costs one session and one pass over the batches. On OpenVINO
each layer runs NNCF again. Measured on MiniLM with 4 batches of 8, 2 cores shared with other
work (load 8-10): ORT dynamic int8 fused 53 s for 24 layers, unfused 120 s for 48; NNCF static
int8 about 7 s a layer, NNCF weight compression about 3 s a layer (pass ``layers=`` to scan a subset).

Other runtimes register their own scan with :func:`register_sensitivity`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from modelpress.artifacts import Artifact
from modelpress.errors import ConfigError, OptimizationError
from modelpress.optimize.configs import DynamicInt8, Precision, StaticInt8, TechniqueConfig, WeightOnly
from modelpress.optimize.handlers import matches

Batches = list[dict[str, np.ndarray]]
Metric = Literal["cosine", "sqnr"]
ONNX_SCAN_OPS = ("MatMul", "Gemm", "Conv", "Attention")
OV_SCAN_OPS = ("MatMul", "Convolution", "GroupConvolution")
# Guards the logarithm and the division when a layer's output is unchanged or all zero.
EPS = 1e-12

Scanner = Callable[[Artifact, TechniqueConfig, Batches, list[str] | None, Metric, int | None], list[tuple[str, float]]]
LayerLister = Callable[[Artifact, TechniqueConfig], list[str]]
SCANNERS: dict[str, tuple[LayerLister, Scanner]] = {}


def register_sensitivity(runtime: str, lister: LayerLister, scanner: Scanner) -> None:
    """Make :func:`quantizable_layers` and :func:`layer_sensitivity` work for ``runtime``."""
    SCANNERS[runtime] = (lister, scanner)


def _scanner(config: TechniqueConfig) -> tuple[LayerLister, Scanner]:
    if config.runtime not in SCANNERS:
        raise OptimizationError(
            f"Layer sensitivity is not available for {type(config).__name__} on {config.runtime}.",
            hint=f"It covers {', '.join(sorted(SCANNERS))}; set auto_exclude: 0 and name the layers to keep in float in exclude.",
        )
    return SCANNERS[config.runtime]


def quantizable_layers(artifact: Artifact, config: TechniqueConfig) -> list[str]:
    """The layers a sensitivity scan of ``config`` ranks (minus those ``config.exclude`` already keeps)."""
    return _scanner(config)[0](artifact, config)


def layer_sensitivity(
    artifact: Artifact,
    config: TechniqueConfig,
    batches: Batches,
    *,
    layers: list[str] | None = None,
    metric: Metric = "cosine",
    threads: int | None = None,
) -> list[tuple[str, float]]:
    """``(layer, score)`` for each layer, worst first.

    ``metric``: ``cosine`` scores ``1 - mean cosine`` of the main output (higher is worse);
    ``sqnr`` scores the signal-to-quantization-noise ratio in dB (lower is worse).
    ``layers``: scan only these (default: :func:`quantizable_layers`).
    """
    if metric not in ("cosine", "sqnr"):
        raise ConfigError(f"Unknown sensitivity metric '{metric}'.", hint="Use metric='cosine' (1 - mean cosine) or metric='sqnr' (dB).")
    if not batches:
        raise OptimizationError("Layer sensitivity needs at least one input batch.", hint="Pass calibration_batches(...)[0].")
    scores = _scanner(config)[1](artifact, config, batches, layers, metric, threads)
    return sorted(scores, key=lambda item: -item[1] if metric == "cosine" else item[1])


# -- scoring ----------------------------------------------------------------------------------
def _rows(out: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
    """One flat row per sample; padded positions of a (batch, sequence, ...) output zeroed."""
    out = np.asarray(out, dtype=np.float64)
    mask = batch.get("attention_mask")
    if mask is not None and out.ndim >= 3 and out.shape[:2] == mask.shape:
        out = out * mask.reshape(mask.shape + (1,) * (out.ndim - 2))
    return out.reshape(out.shape[0], -1)


def damage(reference: list[np.ndarray], candidate: list[np.ndarray], batches: Batches, metric: Metric) -> float:
    """``1 - mean cosine`` or SQNR (dB) of ``candidate`` against ``reference``, over every batch."""
    cosines, signal, noise = [], 0.0, 0.0
    for r, c, b in zip(reference, candidate, batches, strict=True):
        ref, got = _rows(r, b), _rows(c, b)
        signal += float(np.sum(ref**2))
        noise += float(np.sum((ref - got) ** 2))
        cosines.append((ref * got).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), EPS))
    if metric == "sqnr":
        return float(10.0 * np.log10(max(signal, EPS) / max(noise, EPS)))
    return float(1.0 - np.concatenate(cosines).mean())


def _not_excluded(names: dict[str, str] | list[str], config: TechniqueConfig) -> list[str]:
    items = names.items() if isinstance(names, dict) else ((n, "") for n in names)
    return [n for n, scope in items if not matches(n, config.exclude, (scope,))]


def _check_layers(layers: list[str] | None, known: list[str]) -> list[str]:
    if layers is None:
        return known
    unknown = [n for n in layers if n not in known]
    if unknown:
        raise ConfigError(f"Not layers this technique changes: {unknown[:5]}.", hint=f"Layers: {', '.join(known[:8])}, ...")
    return list(layers)


# -- ONNX Runtime ---------------------------------------------------------------------------
def _ort_graph(artifact: Artifact, config: TechniqueConfig) -> Any:
    from modelpress.optimize.quantize.onnxruntime import prepare_graph

    return prepare_graph(artifact, fuse=bool(getattr(config, "fuse", False)) and not isinstance(config, WeightOnly | Precision))


def _ort_layers(artifact: Artifact, config: TechniqueConfig) -> list[str]:
    from modelpress.optimize.quantize import onnxruntime_backend as ob
    from modelpress.optimize.quantize.onnxruntime import layers_for

    graph = _ort_graph(artifact, config)
    scan = ob.onnx_layers(graph.path, ONNX_SCAN_OPS)
    touched = layers_for(graph, config)
    return _not_excluded({n: s for n, s in touched.items() if n in scan}, config)


def _same_length(batches: Batches) -> Batches:
    """Pad every batch to the longest sequence (zeros: pad id, mask 0) for histogram calibrators."""
    if not batches or "attention_mask" not in batches[0]:
        return batches
    longest = max(b["attention_mask"].shape[1] for b in batches)
    out = []
    for b in batches:
        pad = longest - b["attention_mask"].shape[1]
        out.append({k: np.pad(v, ((0, 0), (0, pad))) if v.ndim == 2 and pad else v for k, v in b.items()})
    return out


def splice(float_model: Any, quant_model: Any, layer: str) -> Any:
    """``float_model`` with the one node ``layer`` replaced by what ``quant_model`` made of it.

    The nodes the quantizer made for ``layer`` are found by walking back from the layer's output
    tensors in the quantized graph (quantizers keep output names so the graph stays connected)
    until tensors of the float graph are reached. The result runs the real quantized kernels for
    that layer alone, as quantizing with every other layer excluded would, without running the
    quantizer (about 2 s on MiniLM) once per layer.
    """
    import onnx

    fg, qg = float_model.graph, quant_model.graph
    node = next((n for n in fg.node if n.name == layer), None)
    if node is None:
        raise OptimizationError(f"The graph has no node '{layer}'.")
    own = set(node.output)
    known = {i.name for i in fg.input} | {i.name for i in fg.initializer}
    known |= {o for n in fg.node if n is not node for o in n.output}
    producer = {o: n for n in qg.node for o in n.output}
    picked: set[int] = set()
    stack = list(node.output)
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t not in own and t in known:
            continue  # a tensor of the float graph: the layer's input
        made = producer.get(t)
        if made is None:
            continue  # an initializer of the quantized graph
        picked.add(id(made))
        stack.extend(made.input)
    sub = [n for n in qg.node if id(n) in picked]
    if not sub:
        return float_model  # the quantizer left this layer as it was
    needed = {i for n in sub for i in n.input} - known
    extra = [i for i in qg.initializer if i.name in needed]
    nodes = []
    for n in fg.node:
        nodes.extend(sub if n is node else [n])
    graph = onnx.helper.make_graph(nodes, fg.name, fg.input, fg.output, initializer=list(fg.initializer) + extra)
    opsets = {o.domain: o.version for o in float_model.opset_import}
    for o in quant_model.opset_import:
        opsets[o.domain] = max(o.version, opsets.get(o.domain, 0))
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = max(float_model.ir_version, quant_model.ir_version)
    return model


def _ort_scan(
    artifact: Artifact, config: TechniqueConfig, batches: Batches, layers: list[str] | None, metric: Metric, threads: int | None
) -> list[tuple[str, float]]:
    import onnx

    from modelpress.optimize.quantize import onnxruntime_backend as ob
    from modelpress.optimize.quantize.onnxruntime import dynamic_int8, layers_for

    graph = _ort_graph(artifact, config)
    touched = layers_for(graph, config)
    scan = _check_layers(layers, _ort_layers(artifact, config))
    if isinstance(config, Precision) and config.dtype == "fp32":
        return []  # fp32 changes nothing
    if isinstance(config, StaticInt8) and config.method != "minmax":
        batches = _same_length(batches)
    names = ob.input_names(graph.path)

    def outputs(model: Any) -> list[np.ndarray]:
        sess = ob.session(model, threads)
        main = sess.get_outputs()[0].name
        return [sess.run([main], {n: b[n] for n in names if n in b})[0] for b in batches]

    reference = outputs(graph.path)
    kept = [n for n in touched if matches(n, config.exclude, (touched[n],))]
    scores = []
    with tempfile.TemporaryDirectory(prefix="mp-sensitivity-") as tmp:
        full = Path(tmp) / "all.onnx"
        if isinstance(config, Precision):
            # fp16 changes the types of every tensor, so a layer cannot be spliced in: convert per layer.
            all_nodes = list(ob.onnx_layers(graph.path, ()))
            for name in scan:
                ob.fp16(graph.path, full, exclude=[n for n in all_nodes if n != name])
                scores.append((name, damage(reference, outputs(full), batches, metric)))
            return scores
        if isinstance(config, DynamicInt8):
            dynamic_int8(config, graph.path, full, kept, fused=graph.fused)
        elif isinstance(config, StaticInt8):
            ob.static_int8(
                graph.path,
                full,
                batches,
                method=config.method,
                per_channel=config.per_channel,
                reduce_range=False,
                exclude=kept,
                fused=graph.fused,
            )
        elif isinstance(config, WeightOnly):
            ob.weight_only(
                graph.path, full, bits=config.bits, group_size=config.effective_group_size, symmetric=config.symmetric, exclude=kept
            )
        float_model, quant_model = onnx.load(str(graph.path)), onnx.load(str(full))
        for name in scan:
            scores.append((name, damage(reference, outputs(splice(float_model, quant_model, name)), batches, metric)))
    return scores


# -- OpenVINO -------------------------------------------------------------------------------
def _ov_layers(artifact: Artifact, config: TechniqueConfig) -> list[str]:
    from modelpress.optimize.quantize.openvino import layers_for, ov_graph

    if isinstance(config, Precision):
        return []  # OpenVINO's precision is model-wide: no layer can be kept apart
    _, model, scopes = ov_graph(artifact)
    touched = layers_for(model, scopes, config)
    return _not_excluded({n: s for n, s in touched.items() if n in set(_ov_scan_ops(model))}, config)


def _ov_scan_ops(model: Any) -> list[str]:
    from modelpress.optimize.quantize import openvino_backend as vb

    return vb.ov_layers(model, OV_SCAN_OPS)


def _ov_scan(
    artifact: Artifact, config: TechniqueConfig, batches: Batches, layers: list[str] | None, metric: Metric, threads: int | None
) -> list[tuple[str, float]]:
    from modelpress.optimize.quantize import openvino_backend as vb
    from modelpress.optimize.quantize.openvino import layers_for, ov_graph
    from modelpress.tasks import task_for

    scan = _check_layers(layers, _ov_layers(artifact, config))
    if not scan:
        return []
    _, model, scopes = ov_graph(artifact)
    touched = list(layers_for(model, scopes, config))
    names = [p.get_any_name() for p in model.inputs]

    def outputs(m: Any) -> list[np.ndarray]:
        # f32: the damage of the technique alone, not of bf16 inference on top of it.
        comp = vb.compiled(m, "f32", threads)
        return [np.asarray(comp({n: b[n] for n in names})[0]) for b in batches]

    reference = outputs(model)
    transformer = task_for(artifact).uses_tokenizer()
    scores = []
    for name in scan:
        others = [n for n in touched if n != name]
        fresh = model.clone()
        if isinstance(config, StaticInt8):
            one = vb.static_int8(
                fresh,
                batches,
                transformer=transformer,
                preset=config.preset,
                fast_bias_correction=config.fast_bias_correction,
                ignored=others,
            )
        elif isinstance(config, WeightOnly):
            one = vb.weight_only(
                fresh,
                bits=config.bits,
                symmetric=config.symmetric,
                group_size=config.effective_group_size,
                ratio=1.0,
                ignored=others,
                fallback=config.group_size_fallback,
            )
        else:
            return []
        scores.append((name, damage(reference, outputs(one), batches, metric)))
    return scores


register_sensitivity("onnxruntime", _ort_layers, _ort_scan)
register_sensitivity("openvino", _ov_layers, _ov_scan)


# -- a recipe step that breaks the gate: keep its most sensitive layers in float ------------------
# The calibration inputs of the ranking: 4 batches of 8 real inputs (the scan runs every layer once
# per batch; 32 samples rank MiniLM's layers the same as 64 and take half the time).
RANK_SAMPLES, RANK_BATCH = 32, 8


def rank_layers(source: Artifact, cfg: TechniqueConfig, data_dir: Path | None, *, threads: int | None = None) -> list[str]:
    """The layers of ``source`` that ``cfg`` changes, the most sensitive first (:func:`layer_sensitivity`, cosine),
    on :data:`RANK_SAMPLES` calibration inputs: what :func:`auto_exclude` and the tuner's mixed-precision
    candidates keep in float, in this order."""
    from modelpress.optimize.configs import Calibration
    from modelpress.optimize.handlers import calibration_batches

    batches, _ = calibration_batches(source, Calibration(samples=RANK_SAMPLES, batch_size=RANK_BATCH), data_dir)
    return [name for name, _score in layer_sensitivity(source, cfg, batches, threads=threads)]


def auto_exclude(
    pipe: Any,
    source: Artifact,
    cfg: TechniqueConfig,
    target: Path,
    art: Artifact,
    evaluation: dict[str, Any],
    verdict: Any,
    runtime: str,
) -> tuple[Artifact, dict[str, Any], Any, list[str]]:
    """Keep the most sensitive layers in float (1, 2, 4, ... up to ``cfg.auto_exclude``) until the gate passes.

    ``pipe`` is the :class:`modelpress.optimize.step.Pipeline` the step runs in: each trial is
    applied and judged by it. Returns the last variant, its evaluation and verdict, and the
    layers kept in float.
    """
    import shutil

    ranked = rank_layers(source, cfg, pipe.data_dir)
    if not ranked:
        return art, evaluation, verdict, []
    k = 1
    excluded: list[str] = []
    while k <= min(cfg.auto_exclude, len(ranked)):
        excluded = ranked[:k]
        trial = cfg.excluding(excluded)
        shutil.rmtree(art.path, ignore_errors=True)
        art = pipe.apply(source, trial, target, overwrite=True)
        evaluation, verdict = pipe.judge(art, runtime)
        if verdict.passed or k == min(cfg.auto_exclude, len(ranked)):
            break
        k = min(k * 2, cfg.auto_exclude, len(ranked))
    if art.path is None or not art.path.exists():  # pragma: no cover - defensive
        raise OptimizationError("The auto-exclusion retry left no artifact.")
    return art, evaluation, verdict, excluded
