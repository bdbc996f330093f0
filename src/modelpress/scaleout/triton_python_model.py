"""The Python-backend model of a Triton repository that modelpress writes (copied there as ``model.py``).

Two steps of the ensemble run it, chosen by the model config's ``stage`` parameter:

* ``tokenize``: ``text`` (BYTES) -> the ONNX / OpenVINO model's token inputs (INT64), with the
  tokenizer the server uses (``tokenizer.json``: cut to the model's length, not padded, then padded
  to the batch's longest row on the tokenizer's side), as ``modelpress.tasks.text.TextEncoder`` does;
* ``postprocess``: the model's outputs -> what ``modelpress serve`` answers: ``embedding`` (the
  task's pooling, normalized when the task says so) or ``label``, ``label_id`` and ``scores``.

It needs only ``numpy`` and ``tokenizers`` in Triton's Python environment (``pip install tokenizers``
in the Triton image); it imports nothing of modelpress, so a Triton container runs it as it is.
The functions above the class are the whole computation; a test runs them against our server's answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

SETTINGS_FILE = "settings.json"
TOKENIZER_FILE = "tokenizer.json"
CHARS_PER_TOKEN_BOUND = 64  # as modelpress.serving.handlers: a text is cut to max_length * this many characters first


def load_tokenizer(folder: str | Path, max_length: int) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(folder) / TOKENIZER_FILE))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def tokenize(texts: list[str], tokenizer: Any, settings: dict[str, Any], names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Token inputs of one batch of texts (``names``, default the model's inputs): each cut to the model's length, padded to the longest."""
    cut = int(settings["max_length"]) * CHARS_PER_TOKEN_BOUND
    encs = tokenizer.encode_batch([t[:cut] for t in texts])
    width = max(max(len(e.ids) for e in encs), settings.get("pad_to") or 0)  # pad_to: one length for every request
    n = len(encs)
    ids = np.full((n, width), int(settings["pad_id"]), dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    for i, e in enumerate(encs):
        k = len(e.ids)
        cols = slice(width - k, width) if settings["padding_side"] == "left" else slice(0, k)
        ids[i, cols] = e.ids
        mask[i, cols] = 1
        types[i, cols] = e.type_ids
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: batch[name] for name in names or settings["input_names"]}


def _pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    hidden = hidden.astype(np.float32, copy=False)
    m = mask.astype(np.float32)[:, :, None]
    if mode == "mean":
        return (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return np.where(m > 0, hidden, -1e9).max(1)
    if mode == "lasttoken":
        last = mask.sum(1).astype(np.int64) - 1
        return hidden[np.arange(hidden.shape[0]), last]
    raise ValueError(f"unknown pooling '{mode}'")


def postprocess(outputs: dict[str, np.ndarray], attention_mask: np.ndarray, settings: dict[str, Any]) -> dict[str, np.ndarray]:
    """The answer tensors of one batch, named as the server names them."""
    if settings["task"] == "embedding":
        emb = _pool(outputs["last_hidden_state"], attention_mask, settings["pooling"])
        if settings["normalize"]:
            emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
        return {"embedding": np.ascontiguousarray(emb, dtype=np.float32)}
    logits = outputs["logits"].astype(np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (e / e.sum(-1, keepdims=True)).astype(np.float32)
    ids = probs.argmax(-1).astype(np.int64)
    labels = settings["labels"] or [f"LABEL_{i}" for i in range(probs.shape[-1])]
    return {"label": np.asarray([labels[i].encode() for i in ids], dtype=object), "label_id": ids, "scores": probs}


class TritonPythonModel:
    """Triton's Python-backend interface (``initialize``, ``execute``)."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        here = Path(args["model_repository"]) / args["model_version"]
        self.stage = config["parameters"]["stage"]["string_value"]
        self.settings = json.loads((here / SETTINGS_FILE).read_text())
        self.tokenizer = load_tokenizer(here, int(self.settings["max_length"])) if self.stage == "tokenize" else None

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]  # exists only inside Triton

        responses = []
        for request in requests:
            if self.stage == "tokenize":
                raw = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
                texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
                out = tokenize(texts, self.tokenizer, self.settings, self.settings["tokenize_outputs"])
            else:
                mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()
                model_out = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.settings["output_names"]}
                out = postprocess(model_out, mask, self.settings)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in out.items()]))
        return responses
