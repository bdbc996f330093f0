"""A Triton Inference Server model repository for a served model: same name, versions, inputs and outputs as ours.

    write_triton_repository("minilm@production", "triton-repo")      # modelpress export minilm@production --to triton triton-repo

Triton serves the ONNX model (ONNX Runtime backend) or the OpenVINO IR (OpenVINO backend) with
dynamic batching; text goes in and the task's answer comes out through an ensemble, so a client of
``modelpress serve`` talks to Triton unchanged (``GET /v2/models/NAME`` reports the same name,
versions, inputs and outputs)::

    <name>/config.pbtxt                ensemble: text (BYTES [-1]) -> embedding (FP32 [-1, D]) or label, label_id, scores
    <name>/<version>/                  (empty: an ensemble has no files)
    <name>_tokenize/<version>/         Python backend: model.py, tokenizer.json, settings.json
    <name>_model/<version>/model.onnx  the exported model; its config holds max_batch_size and dynamic_batching
                                       from the serving settings (model.xml + model.bin with --runtime openvino)
    <name>_postprocess/<version>/      Python backend: pooling + normalization, or softmax + labels

The Python steps need ``numpy`` and ``tokenizers`` in Triton's Python environment. A request may
carry at most ``max_batch_size`` texts (Triton's limit for a batching model; ours splits larger
ones). Triton's dynamic batcher merges only requests whose token length is equal: set
``pad_to_length`` in the batching settings to pad every request to one length.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress._fs import atomic_folder
from modelpress.errors import ConfigError, TaskMismatchError, UnsupportedModelError
from modelpress.scaleout import triton_python_model
from modelpress.scaleout.source import check_output, exported_form, resolve
from modelpress.serving.config import BatchConfig, validated

TEXT_TASKS = ("embedding", "text-classification")
# Triton's backend name and the files of the version folder, per runtime
BACKENDS = {"onnxruntime": ("onnxruntime", "onnxruntime_onnx", ("model.onnx",)), "openvino": ("openvino", "", ("model.xml", "model.bin"))}
DATA_TYPES = {
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "bool": "TYPE_BOOL",
}
EXAMPLE = "modelpress export minilm@production --to triton triton-repo"


class Ident(str):
    """An enum value in text format (written bare: TYPE_FP32, KIND_CPU)."""


@dataclass
class TritonRepository:
    """What :func:`write_triton_repository` wrote: the folder, the served name and version, each model's config."""

    path: Path
    name: str
    version: str
    runtime: str
    registry_ref: str | None
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # Triton model name -> config (as written to config.pbtxt)


def _string(s: str) -> str:
    out = []
    for b in s.encode("utf-8"):
        ch = chr(b)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= b < 127:
            out.append(ch)
        else:
            out.append(f"\\{b:03o}")  # text format's octal byte escape: any UTF-8 text round-trips
    return '"' + "".join(out) + '"'


def _value(v: Any, indent: str) -> str:
    if isinstance(v, Ident):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, dict):
        inner = indent + "  "
        body = "".join(_field(k, x, inner) for k, x in v.items())
        return "{\n" + body + indent + "}"
    raise TypeError(f"cannot write {type(v).__name__} to text format")


def _field(key: str, v: Any, indent: str) -> str:
    if isinstance(v, list):
        if v and isinstance(v[0], dict):
            items = ",\n".join(indent + "  " + _value(x, indent + "  ") for x in v)
            return f"{indent}{key} [\n{items}\n{indent}]\n"
        return f"{indent}{key}: [ {', '.join(_value(x, indent) for x in v)} ]\n"
    if isinstance(v, dict):
        return f"{indent}{key} {_value(v, indent)}\n"
    return f"{indent}{key}: {_value(v, indent)}\n"


def to_pbtxt(config: dict[str, Any]) -> str:
    """A model config as Triton's ``config.pbtxt`` (protobuf text format of ``inference.ModelConfig``).

    Written here rather than through ``google.protobuf.text_format``: Triton's generated
    ``model_config_pb2`` ships only in ``tritonclient``, whose ``grpc`` package needs grpcio, and
    modelpress should not need either to write a text file; a test parses the result with it.
    """
    return "".join(_field(k, v, "") for k, v in config.items())


def _dims(shape: list[Any]) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensor(name: str, dtype: str, dims: list[int]) -> dict[str, Any]:
    if dtype not in DATA_TYPES:
        raise UnsupportedModelError(
            f"The tensor '{name}' has the type {dtype}, which Triton configs here do not map.", hint="Use float32 or int64 tensors."
        )
    return {"name": name, "data_type": Ident(DATA_TYPES[dtype]), "dims": dims}


def _params(values: dict[str, str | None]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"string_value": v}} for k, v in values.items() if v is not None]


def _settings(task: Any, signature: Any, batching: BatchConfig) -> dict[str, Any]:
    backend = getattr(task.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TaskMismatchError(
            f"The {task.name} model's tokenizer is not a fast (Rust) tokenizer, which Triton's tokenize step needs (tokenizer.json).",
            hint="Save the model with a fast tokenizer: AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(DIR)",
        )
    enc = task.encoder
    needed = ["last_hidden_state"] if task.name == "embedding" else ["logits"]
    missing = [n for n in needed if n not in signature.output_names]
    if missing:
        raise TaskMismatchError(
            f"The exported {task.name} model has no output {missing[0]} (its outputs: {', '.join(signature.output_names)}).",
            hint="Export a Hugging Face encoder (AutoModel) or classifier (AutoModelForSequenceClassification).",
        )
    return {
        "task": task.name,
        "max_length": enc.max_length,
        "pad_id": enc.pad_id,
        "padding_side": "left" if enc.left else "right",
        "pad_to": batching.pad_to_length,
        "input_names": list(enc.names),
        "tokenize_outputs": list(dict.fromkeys([*enc.names, "attention_mask"])),
        "output_names": needed,
        "pooling": task.config.get("pooling", "mean"),
        "normalize": bool(task.config.get("normalize")),
        "labels": list(getattr(task, "labels", None) or []),
        "tokenizer_json": backend.to_str(),
    }


def _answer_tensors(task: Any) -> list[dict[str, Any]]:
    """The ensemble's outputs, as the server's handler describes them (serving/handlers.py)."""
    if task.name == "embedding":
        return [_tensor("embedding", "float32", [-1, int(task.config.get("hidden_size") or -1)])]
    width = len(getattr(task, "labels", None) or []) or -1
    return [
        {"name": "label", "data_type": Ident("TYPE_STRING"), "dims": [-1]},
        _tensor("label_id", "int64", [-1]),
        _tensor("scores", "float32", [-1, width]),
    ]


def triton_configs(
    name: str, version: int, task: Any, signature: Any, runtime: str, batching: BatchConfig, ref: str | None
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The four model configs (ensemble, tokenize, model, postprocess) by Triton model name, and the Python steps' settings."""
    backend, platform, _ = BACKENDS[runtime]
    tok, mdl, post = f"{name}_tokenize", f"{name}_model", f"{name}_postprocess"
    only = {"specific": {"versions": [version]}}
    specs = {t.name: t for t in [*signature.inputs, *signature.outputs]}
    batched = all(not isinstance(specs[n].shape[0], int) for n in [*signature.input_names, *signature.output_names])
    if not batched:
        raise UnsupportedModelError(
            f"The exported model of '{name}' has a fixed first axis, so Triton cannot batch it.",
            hint="Export it with a dynamic batch axis.",
        )
    settings = _settings(task, signature, batching)
    model_inputs = [_tensor(n, specs[n].dtype, _dims(specs[n].shape[1:])) for n in signature.input_names]
    model_outputs = [_tensor(n, specs[n].dtype, _dims(specs[n].shape[1:])) for n in settings["output_names"]]
    token_tensors = [_tensor(n, "int64", [-1, -1]) for n in settings["tokenize_outputs"]]
    answers = _answer_tensors(task)
    text = {"name": "text", "data_type": Ident("TYPE_STRING"), "dims": [-1]}
    python = {"backend": "python", "max_batch_size": 0, "instance_group": [{"count": 1, "kind": Ident("KIND_CPU")}], "version_policy": only}
    model: dict[str, Any] = {"name": mdl, "backend": backend}
    if platform:
        model["platform"] = platform
    model.update(
        {
            "max_batch_size": batching.max_batch_size,
            "input": model_inputs,
            "output": model_outputs,
            "dynamic_batching": {
                "max_queue_delay_microseconds": int(batching.max_queue_delay_ms * 1000),
                "default_queue_policy": {
                    "max_queue_size": batching.max_queue_size,
                    "default_timeout_microseconds": int(batching.timeout_s * 1_000_000),
                    "timeout_action": Ident("REJECT"),
                },
            },
            "instance_group": [{"count": batching.instances, "kind": Ident("KIND_CPU")}],
            "version_policy": only,
        }
    )

    def step(model_name: str, inputs: list[str], outputs: list[str]) -> dict[str, Any]:
        return {
            "model_name": model_name,
            "model_version": version,
            "input_map": [{"key": n, "value": n} for n in inputs],
            "output_map": [{"key": n, "value": n} for n in outputs],
        }

    post_inputs = [*settings["output_names"], "attention_mask"]
    return {
        name: {
            "name": name,
            "platform": "ensemble",
            "max_batch_size": 0,
            "input": [text],
            "output": answers,
            "ensemble_scheduling": {
                "step": [
                    step(tok, ["text"], settings["tokenize_outputs"]),
                    step(mdl, signature.input_names, settings["output_names"]),
                    step(post, post_inputs, [a["name"] for a in answers]),
                ]
            },
            "version_policy": only,
            "parameters": _params({"task": task.name, "registry_ref": ref, "runtime": runtime}),
        },
        tok: {"name": tok, **python, "input": [text], "output": token_tensors, "parameters": _params({"stage": "tokenize"})},
        mdl: model,
        post: {
            "name": post,
            **python,
            "input": [
                *[_tensor(n, specs[n].dtype, _dims(specs[n].shape)) for n in settings["output_names"]],
                _tensor("attention_mask", "int64", [-1, -1]),
            ],
            "output": answers,
            "parameters": _params({"stage": "postprocess"}),
        },
    }, settings


def _copy_model(src: Path, model_file: str | None, runtime: str, dest: Path) -> None:
    """The model file(s) under the names Triton's backend loads (model.onnx; model.xml + model.bin), and the manifest."""
    main = src / (model_file or BACKENDS[runtime][2][0])
    if not main.is_file():
        raise UnsupportedModelError(
            f"The exported model has no file {main.name}.", hint="Export it again: modelpress export NAME --format onnx"
        )
    if runtime == "onnxruntime":
        shutil.copy2(main, dest / "model.onnx")
        for data in src.glob(main.name + "*.data"):  # external weights (over 2 GB): the graph names them, keep the name
            shutil.copy2(data, dest / data.name)
        for data in src.glob(main.stem + ".data"):
            shutil.copy2(data, dest / data.name)
    else:  # an IR reads the .bin beside its .xml by stem
        shutil.copy2(main, dest / "model.xml")
        shutil.copy2(main.with_suffix(".bin"), dest / "model.bin")
    shutil.copy2(src / "modelpress.json", dest / "modelpress.json")  # provenance: parity figures, parent hash


def write_triton_repository(
    source: str,
    output: str | os.PathLike,
    *,
    runtime: str = "onnxruntime",
    batching: BatchConfig | dict[str, Any] | None = None,
    name: str | None = None,
    registry: str | None = None,
    overwrite: bool = False,
) -> TritonRepository:
    """Write a Triton model repository serving ``source`` (a registry ref, folder or short name) into ``output``.

    ``runtime``: onnxruntime (the ONNX export) or openvino (the IR); ``batching``: the serving
    settings (:class:`~modelpress.serving.config.BatchConfig`: max_batch_size, max_queue_delay_ms,
    max_queue_size, timeout_s, instances, pad_to_length), default the server's defaults.
    The folder is written whole or not at all.
    """
    from modelpress.tasks import task_for

    if runtime not in BACKENDS:
        raise ConfigError(
            f"Triton has no backend here for the runtime '{runtime}'.",
            hint=f"Use onnxruntime or openvino, e.g. {EXAMPLE} --runtime openvino",
        )
    batch = (
        batching
        if isinstance(batching, BatchConfig)
        else validated(BatchConfig, batching or {}, "the batching options", what="batching settings", example="--max-batch-size 32")
    )
    out = check_output(output, overwrite, EXAMPLE)
    resolved = resolve(source, name=name, registry=registry)
    if resolved.task not in TEXT_TASKS:
        raise UnsupportedModelError(
            f"'{resolved.name}' is a {resolved.task} model; Triton repositories are written for text models ({', '.join(TEXT_TASKS)}).",
            hint="Serve other models with modelpress serve, or export the ONNX file (modelpress export NAME --format onnx).",
        )
    if not resolved.version.isdigit():
        raise ConfigError(f"Triton versions are whole numbers; '{resolved.version}' is not.", hint="Use a registry version, e.g. minilm:3")
    task = task_for(resolved.artifact)
    exported = exported_form(resolved, runtime)
    configs, settings = triton_configs(
        resolved.name, int(resolved.version), task, exported.manifest.signature, runtime, batch, resolved.registry_ref
    )
    tokenizer_json = settings.pop("tokenizer_json")
    v = resolved.version
    with atomic_folder(out) as tmp:
        for model_name, config in configs.items():
            (tmp / model_name / v).mkdir(parents=True)
            (tmp / model_name / "config.pbtxt").write_text(to_pbtxt(config))
        _copy_model(Path(exported.path), exported.manifest.model_file, runtime, tmp / f"{resolved.name}_model" / v)
        for stage in ("tokenize", "postprocess"):
            folder = tmp / f"{resolved.name}_{stage}" / v
            shutil.copy2(triton_python_model.__file__, folder / "model.py")
            (folder / triton_python_model.SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
        (tmp / f"{resolved.name}_tokenize" / v / triton_python_model.TOKENIZER_FILE).write_text(tokenizer_json)
    return TritonRepository(out, resolved.name, v, runtime, resolved.registry_ref, configs)
