"""The handler registry: one handler per technique config type, and what handlers share.

This module imports no backend: each backend module (``quantize/``, ``prune/``, ``distill/``)
imports it and registers its handlers with :func:`register_handler`;
:mod:`modelpress.optimize.techniques` imports every backend (so the registry is full).

A handler takes an artifact and a config and writes a NEW artifact folder (with
:meth:`Artifact.write`, so never half-written) whose manifest records:

* ``parent``: the content hash of the source artifact;
* ``step``: the config as JSON (``technique`` first, then ``runtime`` and every setting);
* ``task``, ``signature`` and ``task_config`` (with ``runtime_options``, see below);
* ``metrics``: what the handler found while working (fused operators, calibration size, ...).

Runtime options travel in ``manifest.task_config["runtime_options"]``, keyed by runtime, e.g.
``{"openvino": {"precision": "bf16"}}``: the same shape as ``api.bench(runtime_options=...)``.
:func:`modelpress.runtimes.create_runner` applies them as defaults, so every user of a runner
(evaluate, bench, serve) runs the variant as it was made.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from modelpress.artifacts import Artifact, Manifest, Signature
from modelpress.errors import OptimizationError, UnknownTechniqueError
from modelpress.optimize.configs import CALIBRATION_DEFAULTS, Calibration, TechniqueConfig, parse_step
from modelpress.progress import ProgressFactory


@dataclass
class StepContext:
    """Where and how a handler works: the output folder, the data folder, threads, progress.

    ``progress``: a factory for the training loop's bars (distill, structured-prune fine-tuning);
    ``train_threads``: threads for training (None: all cores on an idle machine, one on a busy one).
    """

    output: Path
    data_dir: Path | None = None
    overwrite: bool = False
    threads: int | None = None
    progress: ProgressFactory | None = None
    train_threads: int | None = None
    data: str | None = None  # the dataset the step is evaluated on (--data): LLM calibration defaults to its training split


Handler = Callable[[Artifact, Any, StepContext], Artifact]
# One handler per (config type, runtime): ``DynamicInt8`` on onnxruntime and on torch are two
# implementations of one technique, registered separately by their backend modules.
HANDLERS: dict[tuple[type[TechniqueConfig], str], Handler] = {}
C = TypeVar("C", bound=type[TechniqueConfig])


def register_handler(config_type: type[TechniqueConfig], runtime: str) -> Callable[[Handler], Handler]:
    """Decorator: ``@register_handler(DynamicInt8, "onnxruntime") def ort_dynamic(source, config, ctx): ...``."""

    def deco(fn: Handler) -> Handler:
        HANDLERS[(config_type, runtime)] = fn
        return fn

    return deco


def handler_for(config: TechniqueConfig) -> Handler:
    """The handler registered for ``config``'s type (or a base class) and runtime.

    This is a lookup only: it finds what the backend modules registered when they were imported.
    :func:`modelpress.optimize.techniques.handler_for` imports every backend first.
    """
    for cls in type(config).__mro__:
        if (cls, config.runtime) in HANDLERS:
            return HANDLERS[(cls, config.runtime)]
    known = ", ".join(sorted(f"{c.__name__}@{rt}" for c, rt in HANDLERS))
    raise UnknownTechniqueError(
        f"No handler is registered for {type(config).__name__} on runtime '{config.runtime}'.",
        hint=f"Known configs: {known or 'none (import modelpress.optimize.techniques to load the backends)'}. "
        f"Register one with @register_handler({type(config).__name__}, '{config.runtime}').",
    )


def apply_technique(
    model: Any,
    config: TechniqueConfig | dict[str, Any],
    output: str | Path,
    *,
    task: str | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    progress: ProgressFactory | None = None,
) -> Artifact:
    """Apply one technique to ``model`` and write the new artifact to ``output`` (no evaluation, no gate).

    The handler is the one registered for the config (:func:`handler_for`); call it through
    :func:`modelpress.optimize.techniques.apply_technique` so that every backend is loaded.
    """
    from modelpress.api import as_artifact
    from modelpress.locations import find_data_dir

    art = as_artifact(model, task)
    cfg = parse_step(config)
    ctx = StepContext(Path(output), find_data_dir(data_dir), overwrite, threads, progress=progress)
    return handler_for(cfg)(art, cfg, ctx)


# -- sources in the format a backend reads ------------------------------------------------
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "mpnet")


def hf_config(artifact: Artifact) -> Any | None:
    """The transformers config of an HF-folder artifact (or of the folder an ONNX came from)."""
    if artifact.path is None or not (artifact.path / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(artifact.path), trust_remote_code=False)
    except (OSError, ValueError, KeyError):
        return None


def onnx_source(artifact: Artifact, *, eager_attention: bool = False) -> Artifact:
    """The artifact as ONNX: itself, or an export cached by content hash.

    ``eager_attention``: export a Hugging Face model with ``attn_implementation="eager"`` and the
    TorchScript exporter, the graph ONNX Runtime's BERT fusion recognises (sdpa is not fused).
    """
    from modelpress.export import exported

    if artifact.format == "onnx" or not eager_attention or artifact.format != "hf":
        if artifact.format == "openvino":
            raise OptimizationError(f"'{artifact.name}' is an OpenVINO IR; ONNX Runtime techniques need the model or its ONNX export.")
        return exported(artifact, "onnx")
    from modelpress.export.cache import cached
    from modelpress.export.onnx import export_onnx

    return cached(
        artifact,
        "onnx-eager",
        lambda target: export_onnx(artifact, target, dynamo=False, attn_implementation="eager", overwrite=True, kv_cache=False),
    )


def openvino_source(artifact: Artifact) -> Artifact:
    from modelpress.export import exported

    return exported(artifact, "openvino")


# -- layers ---------------------------------------------------------------------------------
def matches(name: str, patterns: list[str], aliases: tuple[str, ...] | list[str] = ()) -> bool:
    """A layer matches an exclusion entry equal to its name or a regular expression found in it.

    ``aliases``: other names of the same layer (the torch module path an ONNX node came from);
    an entry matching any of them matches the layer.
    """
    names = [name, *[a for a in aliases if a]]
    return any(p == n or re.search(p, n) for p in patterns for n in names)


def excluded_layers(layers: list[str] | dict[str, str], patterns: list[str]) -> list[str]:
    """The layers an exclusion list keeps in float; ``layers`` may map names to module paths."""
    if isinstance(layers, dict):
        return [n for n, scope in layers.items() if matches(n, patterns, (scope,))]
    return [n for n in layers if matches(n, patterns)]


# -- calibration --------------------------------------------------------------------------
def calibration_batches(
    artifact: Artifact, calib: Calibration, data_dir: Path | None, *, seq_len: int | None = None
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """``calib.samples`` real inputs in batches of ``calib.batch_size``, and what was used.

    Samples are spread over the whole dataset (a seeded permutation), not its first rows. When
    no data folder is present and no file was named, the task's built-in samples are used and
    the manifest says so. Text batches are padded to their longest sample, so they differ in
    sequence length; ``seq_len`` pads (or cuts) every batch to one length instead, for
    calibrators that stack activations (ORT's entropy and percentile).
    """
    from modelpress.datasets import ImageDataset, LabeledTextDataset, PairDataset, TextCorpus, load_dataset
    from modelpress.tasks import task_for

    task = task_for(artifact)
    name = calib.dataset or CALIBRATION_DEFAULTS.get(task.name)
    raw: Any
    used: dict[str, Any]
    if name is None or (data_dir is None and not Path(str(name)).exists()):
        raw = task.sample_raw(calib.samples, None)
        used = {"dataset": "built-in samples (no data folder)", "samples": len(raw)}
    else:
        ds = load_dataset(name, task.dataset_kind if Path(str(name)).exists() else None, data_dir_=data_dir)
        if isinstance(ds, PairDataset):
            pool: Any = ds.texts()
        elif isinstance(ds, LabeledTextDataset):
            pool = ds.texts
        elif isinstance(ds, ImageDataset):
            pool = ds.images
        elif isinstance(ds, TextCorpus):
            pool = [ln.strip() for doc in ds.documents for ln in doc.split("\n") if len(ln.strip()) > 20]
        else:  # pragma: no cover - every dataset kind is handled above
            raise OptimizationError(f"Cannot calibrate on a {type(ds).__name__}.")
        rng = np.random.default_rng(calib.seed)
        idx = np.sort(rng.permutation(len(pool))[: calib.samples])
        raw = pool[idx] if isinstance(pool, np.ndarray) else [pool[i] for i in idx]
        used = {"dataset": ds.name, "samples": len(idx)}
    batches = []
    pad = {"seq_len": seq_len} if seq_len and task.uses_tokenizer() else {}
    for start in range(0, len(raw), calib.batch_size):
        batches.append(task.preprocess(raw[start : start + calib.batch_size], **pad))
    if pad:
        used["seq_len"] = seq_len
    return batches, used


# -- writing a variant --------------------------------------------------------------------
def variant_task_config(source: Artifact, runtime: str, options: dict[str, Any] | None) -> dict[str, Any]:
    cfg = {k: v for k, v in source.manifest.task_config.items() if k != "tokenizer"}
    rt_opts = {k: dict(v) for k, v in (cfg.get("runtime_options") or {}).items() if k == runtime}
    if options:
        rt_opts.setdefault(runtime, {}).update(options)
    if rt_opts:
        cfg["runtime_options"] = rt_opts
    else:
        cfg.pop("runtime_options", None)
    return cfg


def write_variant(
    source: Artifact,
    config: TechniqueConfig,
    ctx: StepContext,
    *,
    fmt: str,
    model_file: str | None,
    fill: Callable[[Path], dict[str, Any] | None],
    signature: Signature | None = None,
    runtime_options: dict[str, Any] | None = None,
    task_config: dict[str, Any] | None = None,
) -> Artifact:
    """Write the artifact a technique made: files from ``fill``, the tokenizer, the manifest."""
    from modelpress.tasks import task_for

    tok_source = source

    def fill_all(tmp: Path) -> dict[str, Any]:
        found = fill(tmp) or {}
        if tok_source.path is not None or tok_source.manifest.task_config.get("tokenizer"):
            task = task_for(tok_source)
            if task.tokenizer is not None and not (tmp / "tokenizer_config.json").is_file():
                task.tokenizer.save_pretrained(str(tmp))
        metrics = {"technique": found.pop("metrics", {}) or {}}
        return {"metrics": metrics, **found}

    cfg = variant_task_config(source, config.runtime, runtime_options)
    if task_config:
        cfg.update(task_config)
    manifest = Manifest(
        name=source.name,
        task=source.task,
        format=fmt,  # type: ignore[arg-type]
        model_file=model_file,
        signature=signature or source.manifest.signature,
        task_config=cfg,
        parent=source.content_hash(),
        step=config.to_step(),
    )
    return Artifact.write(ctx.output, manifest, fill_all, overwrite=ctx.overwrite)


def copy_model_files(src: Path, dst: Path, *, skip: tuple[str, ...] = ("modelpress.json",)) -> None:
    """Copy a model folder's files (hard links where the file system allows, else copies)."""
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if path.is_dir() or rel.as_posix() in skip or any(part.startswith(".") for part in rel.parts):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.hardlink_to(path)
        except OSError:
            shutil.copy2(path, target)
