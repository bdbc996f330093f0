"""How a served model turns requests into batches and batches into answers: one class, explicit hooks.

A :class:`Handler` has four hooks, in the order a request meets them:

* ``decode(inputs) -> Decoded``: task inputs (texts, images) of one request to rows, checked
  and preprocessed one by one (text is tokenized here by the task's own encoder, without
  padding, so the batcher knows each row's length). Runs on the event loop: cheap, and every
  bad input fails here, alone.
* ``collate(rows) -> batch``: rows from many requests to one model batch (text is padded to the
  batch's longest row by the same encoder). Runs in a worker thread, like the next two.
* ``predict(batch) -> outputs``: the runner, exactly as evaluation and benchmarks run it.
* ``split(outputs, batch) -> list``: one result per row (the task's postprocess).

``tensors(results)`` names the results as output tensors for the protocols. Subclass
:class:`Handler` to serve a model the built-in tasks do not cover.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from modelpress.errors import ConfigError, InvalidInputError

MAX_INPUTS_PER_REQUEST = 2048  # rows one request may carry (OpenAI's limit for embeddings)
# A text is cut to max_length * this many characters before it is tokenized, so the tokenizer's work is bounded by the
# model's length, not by the request: a token covers ~4 characters of prose, and WordPiece reads a word of more than 100
# characters as one [UNK], so the cut changes what the model reads only for texts that are mostly whitespace or runs of
# such words (their later tokens would be cut by the model's own truncation anyway).
CHARS_PER_TOKEN_BOUND = 64


@dataclass
class Decoded:
    """One request's rows, their lengths (text: tokens per row, for bucketing), and its token count."""

    rows: list[Any]
    lengths: list[int] | None = None
    tokens: int = 0


@dataclass(frozen=True)
class TensorInfo:
    """A named input or output as the KServe v2 metadata shows it (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class Handler:
    """The hooks between one loaded model and the batcher (see the module docstring)."""

    kind: ClassVar[str] = "custom"  # "text" or "image": which inputs the protocols decode for it

    def __init__(self, task: Any, runner: Any, *, max_text_chars: int = 100_000, allow_non_finite: bool = False) -> None:
        self.task = task
        self.runner = runner
        self.max_text_chars = max_text_chars
        self.allow_non_finite = allow_non_finite

    # -- the hooks -------------------------------------------------------------------------
    def decode(self, inputs: Any) -> Decoded:
        raise NotImplementedError

    def collate(self, rows: list[Any]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runner.run(batch)

    def split(self, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> list[Any]:
        return list(self.task.postprocess(outputs, batch))

    def work(self, rows: list[Any]) -> list[Any]:
        """collate, predict and split: what a worker thread runs for one batch."""
        batch = self.collate(rows)
        return self.split(self.predict(batch), batch)

    # -- what the protocols need -----------------------------------------------------------
    @property
    def task_name(self) -> str:
        return getattr(self.task, "name", "custom")

    def inputs_info(self) -> list[TensorInfo]:
        return []

    def outputs_info(self) -> list[TensorInfo]:
        return []

    def tensors(self, results: list[Any]) -> dict[str, np.ndarray]:
        """Per-row results as named output tensors (first axis: the rows)."""
        if self.task_name == "embedding":
            return {"embedding": np.ascontiguousarray(np.stack(results), dtype=np.float32)}
        return {
            "label": np.asarray([r["label"] for r in results], dtype=object),
            "label_id": np.asarray([r["label_id"] for r in results], dtype=np.int64),
            "scores": np.asarray([r["scores"] for r in results], dtype=np.float32),
        }

    def sample(self, n: int) -> Any:
        """``n`` task inputs for warm-up."""
        return self.task.sample_raw(n)

    def _output_specs(self, width: int) -> list[TensorInfo]:
        if self.task_name == "embedding":
            return [TensorInfo("embedding", "FP32", (-1, width))]
        return [TensorInfo("label", "BYTES", (-1,)), TensorInfo("label_id", "INT64", (-1,)), TensorInfo("scores", "FP32", (-1, width))]


def _check_count(n: int) -> None:
    if n == 0:
        raise InvalidInputError("The request has no inputs.", hint='Send at least one, e.g. ["A man is playing a guitar."]')
    if n > MAX_INPUTS_PER_REQUEST:
        raise InvalidInputError(
            f"The request has {n} inputs; at most {MAX_INPUTS_PER_REQUEST} are accepted in one request.",
            hint=f"Split it into requests of at most {MAX_INPUTS_PER_REQUEST} inputs.",
        )


class TextHandler(Handler):
    """Text tasks: tokenize each request alone (no padding), pad each batch to its longest row.

    Both halves are the task's own encoder (``task.encoder``, :class:`modelpress.tasks.text.TextEncoder`),
    so a batch equals ``task.preprocess(texts)`` for the same texts (a test checks it).
    """

    kind = "text"

    def __init__(self, task: Any, runner: Any, *, pad_to_length: int | None = None, **kwargs: Any) -> None:
        super().__init__(task, runner, **kwargs)
        if getattr(task, "tokenizer", None) is None:
            raise ConfigError(
                f"The {self.task_name} model has no tokenizer, so it cannot take text.", hint="Serve a folder with tokenizer files."
            )
        self.encoder = task.encoder
        self.tokenizer = self.encoder.tokenizer
        self.max_length = self.encoder.max_length
        self.pad_to_length = pad_to_length
        self.vocab_size = self.encoder.vocab_size

    def decode(self, inputs: Any) -> Decoded:
        if not isinstance(inputs, str | list | tuple):
            raise InvalidInputError(
                f"A text model takes a string or a list of strings, not {type(inputs).__name__}.",
                hint='Example: ["first text", "second text"]',
            )
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        _check_count(len(texts))
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInputError(
                    f"Input {i} is a {type(t).__name__}, not a string.",
                    hint='Text models take strings, e.g. ["first text", "second text"].',
                )
            if len(t) > self.max_text_chars:
                raise InvalidInputError(
                    f"Input {i} has {len(t):,} characters; this model accepts at most {self.max_text_chars:,} per text "
                    f"(and reads only its first {self.max_length} tokens).",
                    hint="Send shorter texts, or raise max_text_chars in the model's serve config.",
                )
        cut = self.max_length * CHARS_PER_TOKEN_BOUND
        rows = self.encoder.encode([t[:cut] for t in texts])
        lengths = [len(ids) for ids, _ in rows]
        return Decoded(rows, lengths, sum(lengths))

    def decode_ids(self, sequences: Sequence[Sequence[int]]) -> Decoded:
        """Rows from token ids given by the client (OpenAI's token-array input), cut to the model's length."""
        _check_count(len(sequences))
        rows = []
        limit = self.max_length * CHARS_PER_TOKEN_BOUND  # the same bound as a text's cut: loops below stay short
        for i, seq in enumerate(sequences):
            if not isinstance(seq, list | tuple) or len(seq) == 0:
                raise InvalidInputError(f"Token list {i} is empty.", hint="Send at least one token id, e.g. [101, 7592, 102].")
            if len(seq) > limit:
                raise InvalidInputError(
                    f"Token list {i} has {len(seq):,} ids; this model accepts at most {limit:,} (and reads its first {self.max_length}).",
                    hint="Send at most the model's length in token ids.",
                )
            seq = seq[: self.max_length]
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in seq):
                raise InvalidInputError(
                    f"Token list {i} holds a value that is not a token id of this model (0 to {self.vocab_size - 1}).",
                    hint="Send token ids from this model's tokenizer, or send the text itself.",
                )
            ids = list(seq[: self.max_length])
            rows.append((ids, [0] * len(ids)))
        lengths = [len(ids) for ids, _ in rows]
        return Decoded(rows, lengths, sum(lengths))

    def collate(self, rows: list[Any]) -> dict[str, np.ndarray]:
        return self.encoder.collate(rows, pad_to=self.pad_to_length)

    def inputs_info(self) -> list[TensorInfo]:
        return [TensorInfo("text", "BYTES", (-1,))]

    def outputs_info(self) -> list[TensorInfo]:
        if self.task_name == "embedding":
            width = int(self.task.config.get("hidden_size") or -1)
        else:
            width = len(self.task.labels) or -1
        return self._output_specs(width)


class ImageHandler(Handler):
    """Image classification: check and normalise each request's images; a batch is their stack."""

    kind = "image"

    def decode(self, inputs: Any) -> Decoded:
        try:
            x = np.asarray(inputs)
        except (ValueError, TypeError, RecursionError) as exc:
            raise InvalidInputError(
                f"The images do not form one array: {exc}", hint="Send images of one shape, [N, H, W] or [N, C, H, W]."
            ) from None
        if x.dtype == object or x.dtype.kind not in "biuf":
            raise InvalidInputError(f"Images must be numbers, not {x.dtype}.", hint="Send uint8 pixels 0-255 or float32 values 0-1.")
        if x.dtype.kind == "f" and not self.allow_non_finite and not np.isfinite(x).all():
            raise InvalidInputError(
                "The images contain NaN or infinite values.",
                hint="Send finite pixel values (or set allow_non_finite in the model's serve config).",
            )
        _check_count(int(x.shape[0]) if x.ndim else 0)
        pixels = self.task.preprocess(x)["pixel_values"]
        return Decoded(list(pixels))

    def collate(self, rows: list[Any]) -> dict[str, np.ndarray]:
        return {"pixel_values": np.ascontiguousarray(np.stack(rows))}

    def inputs_info(self) -> list[TensorInfo]:
        c = self.task.config
        return [TensorInfo("image", "FP32", (-1, c["channels"], c["height"], c["width"]))]

    def outputs_info(self) -> list[TensorInfo]:
        return self._output_specs(len(self.task.config.get("labels") or []) or -1)


def handler_for(task: Any, runner: Any, model_config: Any) -> Handler:
    """The built-in handler for ``task`` (embedding, text-classification, image-classification)."""
    common = {"max_text_chars": model_config.max_text_chars, "allow_non_finite": model_config.allow_non_finite}
    if task.name in ("embedding", "text-classification"):
        return TextHandler(task, runner, pad_to_length=model_config.batching.pad_to_length, **common)
    if task.name == "image-classification":
        return ImageHandler(task, runner, **common)
    raise ConfigError(
        f"Serving '{task.name}' models is not supported yet.",
        hint="Serve an embedding, text-classification or image-classification model (chat and completions come with the LLM server).",
    )
