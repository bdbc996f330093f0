"""Knowledge distillation: a smaller student learns to reproduce its teacher (the source artifact).

The student starts from the teacher itself:

* ``layers`` omitted: every other layer of the teacher (0, 2, 4, ...), as DistilBERT did;
* ``layers: 3``: three layers picked evenly, the first and the last always kept (6 -> 0, 3, 5);
* ``layers: [0, 3, 5]``: exactly these teacher layers;
* ``student_config: {num_hidden_layers: 4, intermediate_size: 768}``: a fresh model from the
  teacher's config with these overrides; teacher weights whose name and shape match are copied.

It is then trained on the teacher's outputs (:mod:`.objectives`: embedding cosine/MSE and
hidden states on unlabeled text, soft-label KL + hard-label CE, logit KL) with the shared loop
(:mod:`.training`), within the step and time budget of ``training``. The student is saved as a
normal Hugging Face folder (safetensors, a config with its own layer count, the tokenizer, and
a sentence-transformers model's pooling files, so the embedding task pools it the same way):
an artifact like any other, evaluated, gated, exported and quantized by the steps that follow.

Trained students are cached under ``cache_dir("distill")`` by (teacher content hash, step
config, data folder), and an interrupted run resumes from its checkpoint there: the same
distillation is never trained twice.

Recipe step::

    - {technique: distill, layers: 3, training: {max_steps: 3000, max_seconds: 540, lr: 1e-4}}
    - {technique: static-int8, runtime: openvino}
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from modelpress._fs import atomic_folder
from modelpress.artifacts import Artifact
from modelpress.errors import OptimizationError
from modelpress.optimize.configs import TechniqueConfig
from modelpress.optimize.configs.distill import Distill, DistillTraining  # noqa: F401  (their home is configs)
from modelpress.optimize.handlers import StepContext, apply_technique, copy_model_files, register_handler, write_variant

DISTILL_VERSION = 1  # part of the cache key: bump when the training changes what a config produces
# Files of a sentence-transformers folder that describe pooling and normalisation (weights excluded).
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


# -- the student -----------------------------------------------------------------------------
def layer_plan(n_teacher: int, layers: int | list[int] | None) -> list[int]:
    """The teacher layers the student keeps, in order (see the module docstring)."""
    if layers is None:
        plan = list(range(0, n_teacher, 2))
    elif isinstance(layers, int):
        if layers > n_teacher:
            raise OptimizationError(
                f"The teacher has {n_teacher} layers, so a student cannot take {layers}.", hint=f"Use layers: {max(1, n_teacher // 2)}"
            )
        if layers == 1:
            plan = [n_teacher - 1]
        else:
            plan = [int(i * (n_teacher - 1) / (layers - 1) + 0.5) for i in range(layers)]  # evenly, halves rounded up
    else:
        plan = list(layers)
        if plan[-1] >= n_teacher:
            raise OptimizationError(
                f"layers {plan} names layer {plan[-1]}, but the teacher has layers 0..{n_teacher - 1}.",
                hint=f"Example: layers: [0, {n_teacher // 2}, {n_teacher - 1}]",
            )
    return plan


def find_layers(model: Any) -> tuple[Any, str, Any]:
    """(parent module, attribute, ModuleList) of the model's transformer layers."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and (best is None or name.count(".") < best[0].count(".")):
            best = (name, module)
    if best is None:
        raise OptimizationError(
            f"Could not find the {n} transformer layers of this {type(model).__name__}.",
            hint="Use student_config to build a student instead.",
        )
    parent_name, _, attr = best[0].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr, best[1]


def take_layers(teacher: Any, plan: list[int]) -> Any:
    """A copy of ``teacher`` keeping only the layers in ``plan`` (config and layer indices updated)."""
    import torch

    student = copy.deepcopy(teacher)
    parent, attr, layers = find_layers(student)
    kept = torch.nn.ModuleList([layers[i] for i in plan])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx  # KV-cache slots of decoders are indexed by layer
    setattr(parent, attr, kept)
    student.config.num_hidden_layers = len(plan)
    types = getattr(student.config, "layer_types", None)
    if isinstance(types, list) and len(types) == len(layers):
        student.config.layer_types = [types[i] for i in plan]
    return student


def student_from_config(teacher: Any, overrides: dict[str, Any], task: Any) -> Any:
    """A fresh model from the teacher's config with ``overrides``; matching weights are copied."""
    import torch

    config = copy.deepcopy(teacher.config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise OptimizationError(
                f"student_config: the {type(config).__name__} has no setting '{key}'.",
                hint="Example: student_config: {num_hidden_layers: 3, intermediate_size: 768}",
            )
        setattr(config, key, value)
    if task.name == "embedding" and config.hidden_size != teacher.config.hidden_size:
        raise OptimizationError(
            "An embedding student is trained to match its teacher's embeddings, so it needs the teacher's "
            f"hidden_size ({teacher.config.hidden_size}), not {config.hidden_size}.",
            hint="Shrink it with num_hidden_layers or intermediate_size instead.",
        )
    torch.manual_seed(0)
    student = type(teacher)(config)
    own = student.state_dict()
    copied = {k: v for k, v in teacher.state_dict().items() if k in own and own[k].shape == v.shape}
    student.load_state_dict(copied, strict=False)
    return student


def load_hf_model(artifact: Artifact, task: Any) -> Any:
    """The raw Hugging Face model of an artifact (not the task wrapper), in eval mode."""
    if artifact.format != "hf" or artifact.path is None:
        raise OptimizationError(
            f"This technique trains a Hugging Face model; '{artifact.name}' is a {artifact.format} artifact.",
            hint="Start from the original model folder (distill first, then quantize or export).",
        )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars; training has its own
    from modelpress.runtimes.torch import hf_load_kwargs

    kwargs = hf_load_kwargs(artifact.path)  # safetensors only (pickles by explicit opt-in), no remote code
    return task.auto_model_class().from_pretrained(str(artifact.path), **kwargs).eval()


def copy_sentence_transformers_files(src: Path, dst: Path) -> None:
    """modules.json, the pooling and normalize folders, and the settings files of an ST folder."""
    for name in ST_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (src / "modules.json").is_file():
        for module in json.loads((src / "modules.json").read_text()):
            path = module.get("path")
            if path and (src / path).is_dir():
                shutil.copytree(src / path, dst / path, dirs_exist_ok=True)


def freeze_embeddings(model: Any) -> int:
    """Freeze the input token embeddings; returns how many weights were frozen."""
    emb = model.get_input_embeddings()
    n = 0
    for p in emb.parameters():
        p.requires_grad_(False)
        n += p.numel()
    return n


def parameter_count(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# -- the cache -------------------------------------------------------------------------------
def cache_key(kind: str, source: Artifact, config: TechniqueConfig, data_dir: Path | None, version: int) -> str:
    step = config.to_step()
    step.pop("cache", None)
    payload = {
        "kind": kind,
        "source": source.content_hash(),
        "step": step,
        "data_dir": str(data_dir) if data_dir else None,
        "version": version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def store_in_cache(folder: Path, save: Any) -> Path:
    """Run ``save(tmp)`` in a temporary folder beside ``folder`` and rename it into place.

    Never half-written: an existing entry is replaced only once the new one is complete
    (:func:`modelpress._fs.atomic_folder`), and a failed ``save`` leaves the old entry as it was.
    """
    with atomic_folder(folder) as tmp:
        save(tmp)
    return folder


# -- the handler -----------------------------------------------------------------------------
def train_student(source: Artifact, config: Distill, ctx: StepContext, progress: Any = None) -> tuple[Path, dict[str, Any]]:
    """Train (or find in the cache) the student of ``source``; returns its folder and a report."""
    import torch

    from modelpress.locations import cache_dir
    from modelpress.optimize.train.objectives import Objective, load_train_data
    from modelpress.tasks import task_for

    task = task_for(source)
    key = cache_key("distill", source, config, ctx.data_dir, DISTILL_VERSION)
    folder = cache_dir("distill") / key
    report_file = folder / "distill-report.json"
    if config.cache and report_file.is_file():
        return folder, {**json.loads(report_file.read_text()), "cached": True}
    from modelpress.optimize.train.loop import training_threads

    torch.set_num_threads(training_threads(ctx))
    teacher = load_hf_model(source, task)
    n_teacher = int(teacher.config.num_hidden_layers)
    if config.student_config is not None:
        student, plan = student_from_config(teacher, config.student_config, task), None
    else:
        plan = layer_plan(n_teacher, config.layers)
        student = take_layers(teacher, plan)
    frozen = freeze_embeddings(student) if config.training.freeze_embeddings else 0
    spec = config.training
    data = load_train_data(task, spec, ctx.data_dir)
    objective = Objective(task, teacher, data, spec, layer_map=plan, wrap=task.wrap_module)
    result = objective.fit(
        student,
        checkpoint_dir=cache_dir("distill") / f"{key}.ckpt",
        progress=progress,
        description=f"distilling {source.name} into {len(plan) if plan else '?'} layers",
    )
    for p in student.parameters():
        p.requires_grad_(True)
    report = {
        "teacher_layers": n_teacher,
        "student_layers": int(student.config.num_hidden_layers),
        "layer_map": plan,
        "teacher_parameters": parameter_count(teacher),
        "student_parameters": parameter_count(student),
        "frozen_parameters": frozen,
        "data": data.sources,
        "train_examples": len(data),
        "validation": objective.validation_name,
        "training": result.to_json(),
    }

    def save(tmp: Path) -> None:
        student.save_pretrained(str(tmp))
        if source.path is not None:
            copy_sentence_transformers_files(source.path, tmp)
        if task.tokenizer is not None:
            task.tokenizer.save_pretrained(str(tmp))
        (tmp / "distill-report.json").write_text(json.dumps(report, indent=1, default=str))

    if config.cache:
        store_in_cache(folder, save)
        shutil.rmtree(cache_dir("distill") / f"{key}.ckpt", ignore_errors=True)
        return folder, {**report, "cached": False}
    tmp_folder = Path(tempfile.mkdtemp(prefix="distill-"))
    save(tmp_folder)
    return tmp_folder, {**report, "cached": False, "temporary": True}


@register_handler(Distill, "torch")
def distill_handler(source: Artifact, config: Distill, ctx: StepContext) -> Artifact:
    folder, report = train_student(source, config, ctx, ctx.progress)

    def fill(tmp: Path) -> dict[str, Any]:
        copy_model_files(folder, tmp, skip=("modelpress.json", "distill-report.json"))
        return {"metrics": report}

    try:
        return write_variant(source, config, ctx, fmt="hf", model_file=None, fill=fill)
    finally:
        if report.get("temporary"):
            shutil.rmtree(folder, ignore_errors=True)


def distill(teacher: Any, output: str | os.PathLike, config: Distill | dict[str, Any] | None = None, **options: Any) -> Artifact:
    """Distill ``teacher`` into a student written to ``output``; options as :func:`~modelpress.optimize.techniques.apply_technique`."""
    cfg = config if isinstance(config, Distill) else Distill(**(config or {}))
    return apply_technique(teacher, cfg, output, **options)
