"""What the text tasks share: tokenizing, real sample sentences, the HF wrapper."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import TensorSpec
from modelpress.errors import InvalidInputError, TaskMismatchError

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


def tokenize(tokenizer: Any, texts: list[str], max_length: int, names: list[str], seq_len: int | None = None) -> dict[str, np.ndarray]:
    """Tokenize to int64 arrays; pad to the longest text, or to exactly ``seq_len``."""
    if tokenizer is None:
        raise TaskMismatchError(
            "This text task has no tokenizer.", hint="Load the model from a folder with tokenizer files, or pass --tokenizer DIR."
        )
    if seq_len is not None:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    else:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    out = {}
    for name in names:
        if name in enc:
            out[name] = np.ascontiguousarray(enc[name], dtype=np.int64)
        elif name == "token_type_ids":
            out[name] = np.zeros_like(enc["input_ids"], dtype=np.int64)
    return out


def token_lengths(tokenizer: Any, texts: list[str], max_length: int) -> list[int]:
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [len(ids) for ids in enc["input_ids"]]


def tokenizer_max_length(tokenizer: Any, hf_config: Any, default: int = 512) -> int:
    limits = [default]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    pos = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(pos, int) and pos > 0:
        limits.append(pos)
    return min(limits)
