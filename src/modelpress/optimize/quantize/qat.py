"""Quantization-aware training (``qat``): fine-tune with the quantization simulated, then quantize for real.

1. **Prepare** (torchao's QAT APIs) the task's positional module of the source:

   * ``quantize: static-int8``: PT2E (``torch.export``, then ``prepare_qat_pt2e`` with the
     ``X86InductorQuantizer`` in QAT mode): fake-quantized int8 weights (per output channel, or
     per tensor where the conversion is ONNX Runtime with ``per_channel: false``) and uint8
     per-tensor activations on every Conv/Linear input, conv+batch-norm folding simulated:
     the scheme the static int8 of the torch runtime uses; where the conversion is ONNX Runtime or
     OpenVINO, whose static int8 quantizes attention's Q K^T and P V too, a transformer trains with
     eager attention and those matmuls' inputs fake-quantized as well
     (:func:`.qat_prepare.attention_kernel`);
   * ``quantize: weight-only``: ``quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(...)))``
     on every ``nn.Linear`` (int4 or int8, per group of ``group_size`` input channels or per
     channel, symmetric or not): the round-to-nearest the weight-only step applies afterwards.

2. **Fine-tune** with the shared loop (:mod:`modelpress.optimize.train.loop`: warm-up and decay,
   clipping, held-out evaluation with early stopping and the best weights restored, a step and a
   time budget, progress). The data and held-out split are the distillation ones
   (:mod:`modelpress.optimize.train.objectives`); the loss is the float model's soft labels
   (``alpha``, at ``temperature``) plus the labels (``1 - alpha``) for classifiers, 1 - cosine
   to the float model's sentence embedding for embedding models, and logit KL plus next-token
   cross-entropy for causal LMs.

3. **Convert** with the post-training step itself: the fine-tuned float weights are written
   as a model of the source's format, and the ``quantize`` step's own handler (on this config's
   runtime: torch, onnxruntime or openvino) quantizes them, so the result is exactly the kind of
   artifact that step makes from the original (the same runner, exports and serving path). The
   weights carry what QAT learned; the weight grid is re-derived from them by the same rule the
   fake quantizer simulated (min/max per channel or group). Activation ranges are re-calibrated
   by the step (its ``calibration``), not taken from the QAT observers: no runtime format here
   stores learned ranges, and the calibration sees the fine-tuned model.

The artifact's manifest records the ``qat`` step (``parent``: the source) and, in
``metrics.technique``, the training report and the conversion's own findings.

Recipe step::

    - {technique: qat, runtime: onnxruntime, quantize: {technique: static-int8, per_channel: true},
       training: {max_steps: 300, lr: 2e-5}}
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelpress._fs import replace_folder
from modelpress.artifacts import MANIFEST_NAME, Artifact
from modelpress.errors import DataNotFoundError, DatasetError, OptimizationError
from modelpress.optimize.configs import StaticInt8, WeightOnly, parse_step
from modelpress.optimize.configs.quantize import QAT, QATTraining
from modelpress.optimize.handlers import StepContext, register_handler, write_variant
from modelpress.optimize.quantize.qat_prepare import (
    attention_kernel,
    convert_weight_only,
    prepare_static,
    prepare_weight_only,
    student_class,
    warm_up_observers,
)

OBSERVER_BATCHES = 4  # batches that set the activation ranges before training starts
QAT_TASKS = ("text-classification", "image-classification", "embedding", "causal-lm")
# What each task fine-tunes on, for the error that says what data QAT needs.
DATA_EXAMPLES = {
    "text-classification": "training: {data: [sst2-train]} (or a TSV file 'sentence<TAB>label')",
    "image-classification": "training: {data: [mnist-train5k]}",
    "embedding": "training: {data: [stsb-train, sst2-train]} (plain text, one sentence per line, is enough: no labels needed)",
    "causal-lm": "training: {data: [tinyshakespeare]} (plain text)",
}


# -- the loss -----------------------------------------------------------------------------------
def qat_loss(task: Any, student: Any, teacher: Any, batch: dict[str, Any], names: list[str], spec: QATTraining) -> Any:
    """The fine-tuning loss of one batch: the float model's outputs (and the labels) on the task's module outputs."""
    import torch
    import torch.nn.functional as F

    from modelpress.optimize.train.objectives import torch_pool

    args = [batch[n] for n in names if n in batch]
    out = student(*args)
    with torch.no_grad():
        ref = teacher(*args)
    if task.name == "embedding":
        mode = task.config.get("pooling", "mean")
        s, t = torch_pool(out, batch["attention_mask"], mode), torch_pool(ref, batch["attention_mask"], mode)
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    labels = batch.get("labels")
    if task.name == "causal-lm":
        out, ref = out[:, :-1].reshape(-1, out.shape[-1]), ref[:, :-1].reshape(-1, ref.shape[-1])
        labels = batch["input_ids"][:, 1:].reshape(-1)
    T = spec.temperature
    kd = F.kl_div(F.log_softmax(out / T, -1), F.log_softmax(ref / T, -1), log_target=True, reduction="batchmean") * T * T
    if labels is None or spec.alpha >= 1.0 or not bool((labels >= 0).any()):
        return kd
    known = labels >= 0
    return spec.alpha * kd + (1 - spec.alpha) * F.cross_entropy(out[known], labels[known])


# -- the steps ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _float_module(source: Artifact, attn_implementation: str | None = None) -> tuple[Any, Any, Any]:
    """(the task's positional module, its Hugging Face model or None, the signature) of ``source``, in fp32.

    ``attn_implementation`` (a Hugging Face folder only): the attention kernel of the loaded model.
    """
    from modelpress.runtimes.torch import load_torch_module

    if source.format not in ("hf", "torch"):
        raise OptimizationError(
            f"QAT fine-tunes a PyTorch model; '{source.name}' is a {source.format} artifact.",
            hint="Start from the original model (a HF folder or a torch module); QAT converts to ONNX Runtime or OpenVINO itself.",
        )
    if (source.manifest.task_config.get("runtime_options") or {}).get("torch", {}).get("transform"):
        raise OptimizationError(
            f"'{source.name}' is already a quantized or cast torch variant; QAT starts from float weights.",
            hint="Put qat first in the recipe, on the original model.",
        )
    import copy

    module, signature = load_torch_module(source, attn_implementation=attn_implementation if source.format == "hf" else None)
    module = copy.deepcopy(module).float()  # the source's module (a torch artifact's own) stays as it is
    hf = getattr(module, "model", None) if source.format == "hf" else None
    return module, hf, signature


def training_data(task: Any, spec: QATTraining, data_dir: Path | None) -> Any:
    """The fine-tuning data, or an error that says what QAT needs for this task."""
    from modelpress.optimize.train.objectives import load_train_data

    if task.name not in QAT_TASKS:
        raise OptimizationError(f"QAT has no training objective for task '{task.name}'.", hint=f"QAT trains {', '.join(QAT_TASKS)} models.")
    try:
        return load_train_data(task, spec, data_dir)
    except (DataNotFoundError, DatasetError) as exc:
        raise DatasetError(
            f"QAT fine-tunes on training data and found none it can use for this {task.name} model: {exc.message}",
            hint=f"Name a training split or a file, e.g. {DATA_EXAMPLES[task.name]}; point --data-dir (or MODELPRESS_DATA) at the "
            "folder that holds it. Without training data use the post-training step instead (technique: static-int8).",
        ) from exc


def finetune(source: Artifact, config: QAT, ctx: StepContext) -> tuple[Any, Any, dict[str, Any]]:
    """Fine-tune ``source`` with ``config``'s quantization simulated; (float module, HF model or None, report)."""
    import torch

    from modelpress.optimize.train.loop import train, training_threads
    from modelpress.optimize.train.objectives import Objective
    from modelpress.progress import no_progress
    from modelpress.runtimes.torch_transforms import matches, quantizable_layers
    from modelpress.tasks import task_for

    task = task_for(source)
    target = config.target()
    spec = config.training
    data = training_data(task, spec, ctx.data_dir)
    kernel = attention_kernel(target)  # None unless static int8 converted on ONNX Runtime / OpenVINO
    module, hf, signature = _float_module(source, kernel)
    names = list(signature.input_names)
    teacher = _float_module(source)[0].eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    objective = Objective(task, teacher, data, spec, wrap=lambda m: m.graph if hasattr(m, "graph") else m)
    frozen = []
    if hf is not None and spec.freeze_embeddings and task.uses_tokenizer():
        emb = {id(p) for p in hf.get_input_embeddings().parameters()}
        frozen = [n for n, p in module.named_parameters() if id(p) in emb]
    kind = "static" if isinstance(target, StaticInt8) else "weight-only"
    static_kind = "static-int8" if kind == "static" else "dynamic-int8"
    excluded = [n for n in quantizable_layers(module, static_kind) if matches(n, target.exclude)]
    t0 = time.perf_counter()
    with _threads(training_threads(ctx)):
        torch.manual_seed(spec.seed)
        if isinstance(target, StaticInt8):
            example = objective.batch(0)
            per_channel = target.per_channel or target.runtime != "onnxruntime"
            args = tuple(example[n] for n in names if n in example)
            eager = hf is not None and kernel == "eager"  # a torch module (no Hugging Face attention) trains as it is
            graph = prepare_static(module, args, per_channel=per_channel, excluded=excluded, matmuls=eager)
            student = student_class()(graph, exported=True)
            warm_up_observers(student, [objective.batch(i) for i in range(OBSERVER_BATCHES)], names)
            scheme = {
                "weights": f"int8 per {'channel' if per_channel else 'tensor'}, symmetric",
                "activations": "uint8 per tensor (PT2E, X86)",
            }
            if hf is not None:
                scheme["attention"] = "eager, matmuls fake-quantized" if eager else "default kernel, float"
        else:
            graph = prepare_weight_only(module, target, excluded)
            student = student_class()(graph, exported=False)
            group = target.effective_group_size
            per = "channel" if group == -1 else f"group of {group}"
            scheme = {"weights": f"int{target.bits} per {per}, {'symmetric' if target.symmetric else 'asymmetric'}"}
        for name, p in student.graph.named_parameters():
            p.requires_grad_(name not in frozen)
        result = train(
            student,
            lambda m, step: qat_loss(task, m, teacher, objective.batch(step), names, spec),
            spec,
            evaluate=(lambda m: objective.evaluate(m)) if objective.can_evaluate else None,
            higher_is_better=objective.higher_is_better,
            progress=ctx.progress or no_progress,
            description=f"quantization-aware training of {source.name} ({scheme['weights']})",
        )
    if kind == "static":
        state = student.graph.state_dict()
        own = module.state_dict()
        unused = set(getattr(student.graph, "unused_weights", []))
        # num_batches_tracked: a counter, not a weight
        missing = [k for k in own if k not in state and k not in unused and not k.endswith("num_batches_tracked")]
        if missing:
            raise OptimizationError(
                f"The trained graph lost {len(missing)} of the model's weights ({', '.join(missing[:3])}).",
                hint="Use quantize: {technique: weight-only} for this model (eager QAT), or post-training static-int8.",
            )
        module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    elif isinstance(target, WeightOnly):
        convert_weight_only(module, target)
    module.requires_grad_(True)
    module.eval()
    report = {
        "scheme": scheme,
        "data": data.sources,
        "train_examples": len(data),
        "validation": objective.validation_name,
        "frozen": frozen,
        "training": result.to_json(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return module, hf, report


def _write_float(source: Artifact, config: QAT, module: Any, hf: Any, folder: Path) -> Artifact:
    """The fine-tuned float model as an artifact of the source's format (the conversion's input)."""
    from modelpress.tasks import task_for

    def fill(tmp: Path) -> dict[str, Any]:
        if hf is not None:
            from modelpress.optimize.distill.distill import copy_sentence_transformers_files

            hf.save_pretrained(str(tmp))
            if source.path is not None:
                copy_sentence_transformers_files(source.path, tmp)
            tok = task_for(source).tokenizer
            if tok is not None:
                tok.save_pretrained(str(tmp))
        else:
            from safetensors.torch import save_model

            from modelpress.runtimes.torch import MODULE_WEIGHTS

            save_model(module, str(tmp / MODULE_WEIGHTS))
        return {}

    art = write_variant(
        source,
        config,
        StepContext(folder, overwrite=True),
        fmt=source.format,
        model_file=source.manifest.model_file if hf is None else None,
        fill=fill,
    )
    if hf is None:
        art.module = module
    return art


@register_handler(QAT, "torch")
@register_handler(QAT, "onnxruntime")
@register_handler(QAT, "openvino")
def qat_handler(source: Artifact, config: QAT, ctx: StepContext) -> Artifact:
    """Fine-tune with fake quantization, then convert with the ``quantize`` step on ``config.runtime``."""
    from modelpress.optimize.handlers import handler_for  # the lookup: the step runs through techniques, every backend is loaded

    if ctx.output.exists() and not ctx.overwrite:
        from modelpress.errors import ArtifactError

        raise ArtifactError(f"'{ctx.output}' already exists.", hint="Choose another output folder or pass overwrite=True (--force).")
    target = config.target()
    module, hf, report = finetune(source, config, ctx)
    ctx.output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{ctx.output.name}.qat-", dir=ctx.output.parent))  # beside the output: renamed into place
    try:
        tuned = _write_float(source, config, module, hf, work / "float")
        advance = (ctx.progress or (lambda *_: lambda n: None))(f"converting with {target.label()}", None)
        art = handler_for(target)(tuned, target, dataclasses.replace(ctx, output=work / "variant", overwrite=True))
        advance(1)
        conversion = art.manifest.metrics.get("technique") or {}
        manifest = art.manifest.model_copy(
            update={
                "step": config.to_step(),
                "parent": source.content_hash(),
                "metrics": {**art.manifest.metrics, "technique": {"qat": report, "conversion": conversion}},
            }
        )
        (work / "variant" / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
        replace_folder(work / "variant", ctx.output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Artifact.open(ctx.output)
    if art.module is not None:
        out.module = art.module
    return out


# -- for the tuner --------------------------------------------------------------------------------
# The tuner's QAT training per task (benchmarks/qat_bench.py, docs/qat.md's table): the CNN was trained at lr 3e-3,
# so the step's 2e-5 (sized for fine-tuned transformers) barely moves it; 600 steps at 5e-4 won back 60% of static
# int8's loss on mnist-cnn. The transformers keep the step's defaults. The tuner bounds each by its training time.
TUNE_TRAINING: dict[str, dict[str, Any]] = {
    "image-classification": {"max_steps": 600, "lr": 5e-4},
    "text-classification": {"max_steps": 300, "lr": 2e-5},
    "embedding": {"max_steps": 300, "lr": 2e-5},
    "causal-lm": {"max_steps": 300, "lr": 2e-5},
}


def qat_candidate(
    task: str,
    runtime: str = "torch",
    *,
    quantize: dict[str, Any] | None = None,
    max_steps: int | None = None,
    max_seconds: float = 600.0,
    data: list[str] | None = None,
    data_dir: Path | None = None,
) -> QAT | None:
    """A QAT step for a tuner candidate, or None when ``task`` has no training objective or no training data.

    ``data``: the training splits (None: the task's default, which needs a data folder: ``data_dir``
    or the shared one). Steps and learning rate: :data:`TUNE_TRAINING` for ``task`` (``max_steps``
    overrides the steps); the final weights are kept (the step's default: no held-out selection).
    """
    from modelpress.locations import find_data_dir
    from modelpress.optimize.train.objectives import TRAIN_DEFAULTS

    if task not in QAT_TASKS:
        return None
    if data is None and (task not in TRAIN_DEFAULTS or (data_dir is None and find_data_dir() is None)):
        return None
    training: dict[str, Any] = {**TUNE_TRAINING[task], "max_seconds": max_seconds}
    if max_steps is not None:
        training["max_steps"] = max_steps
    if data is not None:
        training["data"] = data
    step = {"technique": "qat", "runtime": runtime, "quantize": quantize or {"technique": "static-int8"}, "training": training}
    return parse_step(step)  # type: ignore[return-value]
