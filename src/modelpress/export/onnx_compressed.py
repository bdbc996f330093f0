"""``modelpress export DECODER_FOLDER -f onnx`` for a weight-compressed LLM variant (GPTQ, round-to-nearest,
scale estimation on ``openvino-decoder``): ``model.onnx`` (the full-sequence graph the runners score) and
``decoder.onnx`` (past keys and values, for the ONNX Runtime engine), both with the integer weights the
compression chose as ``MatMulNBits`` (:mod:`.onnx_nbits`), both checked against the OpenVINO decoder (f32)
before the folder is renamed into place: ``model.onnx`` on every position's logits, ``decoder.onnx`` on greedy
tokens and logits generated with the past growing (:func:`modelpress.export.onnx_decoder.check_decoder`).

AWQ and SmoothQuant variants are refused: AWQ rescales float weights besides the codes, SmoothQuant quantizes
activations, and neither is what ``MatMulNBits`` holds.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import Artifact, Manifest
from modelpress.errors import UnsupportedModelError
from modelpress.export import onnx_decoder
from modelpress.export.onnx_nbits import IR_FILE, Quantized, rebuild, write_nbits
from modelpress.export.parity import check_parity, parity_batches
from modelpress.locations import find_data_dir
from modelpress.runtimes import create_runner
from modelpress.tasks import task_for

IR_META = "engine.json"
# Parity of the ONNX graphs with the OpenVINO decoder they come from: the logits' max-abs-diff at most this
# share of the largest reference logit (at least 1). The codes, scales and zero points are the same numbers
# (both runtimes dequantize to f32 and multiply in f32); what differs is the order of f32 sums: on the
# stories260k GPTQ variant the logits differ by 2.6e-5 at most where they reach ~22 (1e-6 relative, the
# size of a float export's differences). The export parity's 1e-3 (PARITY_RTOL) applies unchanged; that the
# codes are the IR's own, not a re-quantization, is checked on the codes themselves (tests/export).
NBITS_PARITY_RTOL = onnx_decoder.PARITY_RTOL
REFUSED = ("awq", "smoothquant")
_COPIED = ("config.json", "generation_config.json")


def is_compressed_decoder(source: Artifact) -> bool:
    """Whether ``source`` is a decoder folder an LLM technique wrote (``decoder.xml`` and ``engine.json``)."""
    return source.format == "openvino" and source.path is not None and (source.path / IR_META).is_file()


def _refuse(source: Artifact, meta: dict[str, Any]) -> None:
    algo = str(meta.get("quantize") or "")
    if not algo or any(r in algo for r in REFUSED):
        raise UnsupportedModelError(
            f"'{source.path}' is a {algo or 'float'} decoder: the ONNX export carries weight-only compressed codes "
            "(gptq, rtn, scale estimation) and nothing else"
            + (" (AWQ rescales float weights, SmoothQuant quantizes activations)." if algo else "."),
            hint="Export a GPTQ or round-to-nearest variant (technique gptq or weight-only on openvino-decoder), or export "
            "the original model: modelpress export ../shared/data/models/stories260k -f onnx -o out/s260k-onnx",
        )


def ov_greedy(runner: Any) -> Any:
    """The OpenVINO decoder's greedy tokens and each step's last-position logits (a plain loop over the whole
    sequence, no cache): the reference :func:`~modelpress.export.onnx_decoder.check_decoder` compares with."""

    def greedy(prompt: Sequence[int], new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
        ids = list(prompt)
        tokens, logits = [], []
        for _ in range(new_tokens):
            x = np.asarray([ids], dtype=np.int64)
            row = runner.run({"input_ids": x, "attention_mask": np.ones_like(x)})["logits"][0, -1].astype(np.float32)
            logits.append(row)
            tokens.append(int(row.argmax()))
            ids.append(tokens[-1])
        return tokens, logits

    return greedy


def export_compressed(
    source: Artifact,
    output: str | os.PathLike,
    *,
    dynamo: bool = True,
    opset: int = onnx_decoder.DEFAULT_OPSET,
    overwrite: bool = False,
    kv_cache: bool = True,
    **_: Any,
) -> Artifact:
    """Export the weight-compressed decoder folder ``source`` to an ONNX artifact at ``output`` (``model.onnx``, and
    with ``kv_cache`` ``decoder.onnx``), the compressed weights as ``MatMulNBits``, checked against the IR."""
    import torch

    folder = source.path
    if not is_compressed_decoder(source) or folder is None:
        raise UnsupportedModelError(f"'{source.name}' is not a decoder folder an LLM technique wrote ({IR_FILE} and {IR_META}).")
    meta = json.loads((folder / IR_META).read_text())
    _refuse(source, meta)
    if not meta.get("all_logits"):
        raise UnsupportedModelError(
            f"The decoder in '{source.path}' returns the last position's logits only: its model.onnx needs every position's.",
            hint="Make the variant with an LLM technique (they write all_logits decoders).",
        )
    hf, weights = rebuild(folder)
    task = task_for(source)
    signature = task.signature(hf.config)
    module = task.wrap_module(hf).eval()
    rows = onnx_decoder.unpadded_rows(parity_batches(task, find_data_dir()))
    manifest = Manifest(
        name=source.name,
        task=source.task,
        format="onnx",
        model_file="model.onnx",
        signature=signature,
        task_config={k: v for k, v in source.manifest.task_config.items() if k != "tokenizer"},
        parent=source.content_hash(),
    )
    reference = create_runner(source, "openvino-decoder", threads=1, precision="f32")

    def fill(tmp: Path) -> dict[str, Any]:
        from modelpress.export.onnx import torch_to_onnx

        for name in _COPIED:
            if (folder / name).is_file():
                shutil.copy(folder / name, tmp / name)
        if task.tokenizer is not None:
            task.tokenizer.save_pretrained(str(tmp))
        args = tuple(torch.from_numpy(rows[0][n]) for n in signature.input_names)
        with torch.inference_mode():
            how = torch_to_onnx(module, args, tmp / "model.onnx", signature, opset=opset, dynamo=dynamo)
        counts = write_nbits(tmp / "model.onnx", weights)
        served = create_runner(Artifact(manifest.model_copy(deep=True), tmp), "onnxruntime", threads=1)
        try:
            parity = check_parity(reference.run, served.run, rows, rtol=NBITS_PARITY_RTOL)
        finally:
            served.close()
        step = {"export": "onnx", "exporter": how, "opset": opset, "weights": meta.get("quantize"), "kv_decoder": None}
        metrics: dict[str, Any] = {"parity_max_abs_diff": parity, "nbits": counts}
        if kv_cache:
            step.update(_decoder(hf, tmp, weights, meta, reference, task, dynamo=dynamo, opset=opset, metrics=metrics))
        return {"metrics": metrics, "step": step}

    try:
        return Artifact.write(output, manifest, fill, overwrite=overwrite)
    finally:
        reference.close()


def _decoder(
    hf: Any,
    tmp: Path,
    weights: dict[str, Quantized],
    meta: dict[str, Any],
    reference: Any,
    task: Any,
    *,
    dynamo: bool,
    opset: int,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """``decoder.onnx`` with the compressed weights, checked on generated tokens against the IR; the step's record."""
    how = onnx_decoder.export_decoder(hf, tmp, dynamo=dynamo, opset=opset)
    write_nbits(tmp / onnx_decoder.DECODER_FILE, weights)
    prompts = [task.encode(p) for p in onnx_decoder.PARITY_PROMPTS]
    report = onnx_decoder.check_decoder(
        None, onnx_decoder.DecoderSession(tmp, threads=1), prompts, rtol=NBITS_PARITY_RTOL, greedy=ov_greedy(reference)
    )
    report.pop("reference_tokens")
    dec_meta = onnx_decoder.read_meta(tmp)
    dec_meta.update(quantize=meta.get("quantize"), parity={**report, "reference": "openvino-decoder f32"})
    (tmp / onnx_decoder.META_FILE).write_text(json.dumps(dec_meta, indent=2))
    metrics["kv_decoder_parity"] = report
    return {"kv_decoder": onnx_decoder.DECODER_FILE, "kv_decoder_exporter": how}


__all__ = ["NBITS_PARITY_RTOL", "export_compressed", "is_compressed_decoder", "ov_greedy"]
