"""What the text tasks share: tokenizing, real sample sentences, the HF wrapper."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import TensorSpec
from modelpress.errors import InvalidInputError, TaskMismatchError
from modelpress.tasks.base import Task

# Used for samples when the data folder is absent (a user's machine). Written for modelpress.
FALLBACK_SENTENCES = [
    "A man is playing a guitar on the street.",
    "The cat sleeps on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "She ordered a coffee and opened her laptop.",
    "Two children are building a sandcastle at the beach.",
    "The committee will publish its report next week.",
    "Heavy rain caused flooding in several villages.",
    "He forgot his keys and had to wait outside.",
    "A dog is running through a field of tall grass.",
    "The new bridge opened to traffic on Monday.",
    "Scientists found water ice near the lunar pole.",
    "The orchestra played the symphony without a conductor.",
    "Our train was delayed by almost an hour.",
    "A woman is slicing tomatoes in the kitchen.",
    "The team celebrated their victory late into the night.",
    "Prices for fresh vegetables rose again this month.",
]


def real_sentences(n: int, data_dir: Path | None) -> list[str]:
    """``n`` real sentences: STS-B dev when the data folder has it, else a built-in list."""
    pool: list[str] = []
    if data_dir is not None and (data_dir / "stsb/sts-dev.csv").is_file():
        from modelpress.datasets.local import read_stsb

        pool = read_stsb(data_dir / "stsb/sts-dev.csv").texts()
    if not pool:
        pool = FALLBACK_SENTENCES
    return [pool[i % len(pool)] for i in range(n)]


def check_texts(inputs: Sequence[Any]) -> list[str]:
    if isinstance(inputs, str):
        inputs = [inputs]
    if len(inputs) == 0:
        raise InvalidInputError("No input texts were given.", hint='Send at least one string, e.g. ["A man is playing a guitar."]')
    bad = [i for i, t in enumerate(inputs) if not isinstance(t, str)]
    if bad:
        raise InvalidInputError(
            f"Input {bad[0]} is a {type(inputs[bad[0]]).__name__}, not a string.",
            hint='Text tasks take strings, e.g. ["first text", "second text"].',
        )
    return list(inputs)


def text_input_specs(tokenizer: Any) -> list[TensorSpec]:
    names = ["input_ids", "attention_mask"]
    if tokenizer is not None and "token_type_ids" in getattr(tokenizer, "model_input_names", []):
        names.append("token_type_ids")
    return [TensorSpec(name=n, dtype="int64", shape=["batch", "sequence"]) for n in names]


Row = tuple[list[int], list[int]]  # one text's token ids and token type ids, unpadded


class TextEncoder:
    """Texts to model inputs: the one tokenizer path of the text tasks and of the server.

    Two halves that the server runs apart (and :meth:`__call__` runs together): :meth:`encode`
    tokenizes each text alone, cut to ``max_length`` tokens and not padded (so a batcher can
    group rows of similar length), and :meth:`collate` pads rows to one batch (to the longest
    row, or to ``pad_to``), on the side the tokenizer pads. The result equals the tokenizer's
    own ``tokenizer(texts, padding=True, truncation=True, max_length=...)`` (a test checks it);
    a fast tokenizer's Rust backend is called directly, which costs half of the Python wrapper.
    """

    def __init__(self, tokenizer: Any, max_length: int, names: Sequence[str]) -> None:
        if tokenizer is None:
            raise TaskMismatchError(
                "This text task has no tokenizer.", hint="Load the model from a folder with tokenizer files, or pass --tokenizer DIR."
            )
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.names = list(names)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0
        self.left = getattr(tokenizer, "padding_side", "right") == "left"
        self.vocab_size = len(tokenizer)
        self._fast = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            fast = Tokenizer.from_str(backend.to_str())  # a copy: the tokenizer itself keeps its settings
            fast.no_padding()
            fast.enable_truncation(self.max_length)
            self._fast = fast

    def encode(self, texts: list[str], max_length: int | None = None) -> list[Row]:
        """Each text's (ids, type ids), cut to ``max_length`` tokens (default: the model's), unpadded."""
        if self._fast is not None and (max_length is None or max_length == self.max_length):
            encs = [self._fast.encode(texts[0])] if len(texts) == 1 else self._fast.encode_batch(texts)
            return [(e.ids, e.type_ids) for e in encs]
        enc = self.tokenizer(texts, truncation=True, max_length=max_length or self.max_length)
        types = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
        return [(list(ids), list(t)) for ids, t in zip(enc["input_ids"], types, strict=True)]

    def collate(self, rows: Sequence[Row], pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Rows padded to one batch: to the longest row, or to ``pad_to`` when that is longer."""
        width = max(max(len(ids) for ids, _ in rows), pad_to or 0)
        n = len(rows)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for i, (row_ids, row_types) in enumerate(rows):
            k = len(row_ids)
            cols = slice(width - k, width) if self.left else slice(0, k)
            ids[i, cols] = row_ids
            mask[i, cols] = 1
            types[i, cols] = row_types
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: batch[name] for name in self.names}

    def __call__(self, texts: list[str], seq_len: int | None = None) -> dict[str, np.ndarray]:
        """One batch: padded to the longest text, or cut and padded to exactly ``seq_len`` tokens."""
        return self.collate(self.encode(texts, seq_len), pad_to=seq_len)

    def lengths(self, texts: list[str]) -> list[int]:
        """Tokens per text (after cutting to ``max_length``)."""
        return [len(ids) for ids, _ in self.encode(texts)]


def text_encoder(task: Any, max_length: int, names: Sequence[str]) -> TextEncoder:
    """The task's encoder, made once and made again only when its tokenizer or settings change."""
    enc = getattr(task, "_encoder", None)
    if enc is None or enc.tokenizer is not task.tokenizer or enc.max_length != int(max_length) or enc.names != list(names):
        enc = task._encoder = TextEncoder(task.tokenizer, max_length, names)
    return enc


def tokenizer_max_length(tokenizer: Any, hf_config: Any, default: int = 512) -> int:
    limits = [default]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    pos = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(pos, int) and pos > 0:
        limits.append(pos)
    return min(limits)


class TextInputTask(Task):
    """A task whose inputs are texts for an encoder (embedding, text classification): the
    signature's text inputs, cut to ``max_length`` tokens by one :class:`TextEncoder`, and real
    sentences as samples. (Causal LM texts are cut to its context instead.)"""

    @property
    def max_length(self) -> int:
        return int(self.config.get("max_length") or tokenizer_max_length(self.tokenizer, None))

    @property
    def encoder(self) -> TextEncoder:
        """Texts to model inputs (the server tokenizes and pads with this too)."""
        return text_encoder(self, self.max_length, [s.name for s in text_input_specs(self.tokenizer)])

    def preprocess(self, inputs: Sequence[Any], seq_len: int | None = None) -> dict[str, np.ndarray]:
        return self.encoder(check_texts(inputs), seq_len)

    def sample_raw(self, n: int, data_dir: Path | None = None) -> list[str]:
        return real_sentences(n, data_dir)

    def sample_inputs(self, batch_size: int, seq_len: int | None = None, data_dir: Path | None = None) -> dict[str, np.ndarray]:
        return self.preprocess(self.sample_raw(batch_size, data_dir), seq_len=seq_len)
