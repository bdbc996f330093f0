"""Datasets: named public files from the data folder, a user's files, or the Hugging Face hub.

``load_dataset(spec, kind)`` takes a name (``stsb-dev``, ``sst2-dev``, ``trec-test``,
``wikitext2-test``, ``tinystories``, ``mnist-test``, ...), a file path, or ``hf:NAME:SPLIT``.
"""

from __future__ import annotations

import os
from pathlib import Path

from modelpress.datasets.base import Dataset, ImageDataset, LabeledTextDataset, PairDataset, TextCorpus
from modelpress.datasets.files import read_file
from modelpress.datasets.hub import read_hub
from modelpress.datasets.local import NAMED
from modelpress.errors import DatasetError
from modelpress.locations import data_dir

__all__ = [
    "NAMED",
    "Dataset",
    "ImageDataset",
    "LabeledTextDataset",
    "PairDataset",
    "TextCorpus",
    "load_dataset",
]


def load_dataset(
    spec: str | os.PathLike,
    kind: type | None = None,
    *,
    data_dir_: str | os.PathLike | None = None,
    columns: dict[str, str] | None = None,
    limit: int | None = None,
) -> Dataset:
    """Load a dataset by name, path or hub spec; ``kind`` is the shape the task needs."""
    text = str(spec)
    ds: Dataset
    if text in NAMED:
        ds = NAMED[text][0](data_dir(data_dir_))
    elif text.startswith("hf:"):
        if kind is None:
            raise DatasetError("A hub dataset needs a task to know its shape.", hint="Pass --task, e.g. --task text-classification")
        ds = read_hub(text, kind, columns)
    elif Path(text).exists():
        if kind is None:
            raise DatasetError(f"Reading '{text}' needs a task to know its columns.", hint="Pass --task, e.g. --task embedding")
        ds = read_file(text, kind, columns)
    else:
        raise DatasetError(
            f"Unknown dataset '{text}': it is neither a known name nor an existing file.",
            hint=f"Known names: {', '.join(sorted(NAMED))}; or a CSV/TSV/JSONL/TXT/NPZ path; or hf:NAME:SPLIT.",
        )
    if kind is not None and not isinstance(ds, kind):
        raise DatasetError(
            f"Dataset '{text}' holds {type(ds).__name__}, but this task needs {kind.__name__}.",
            hint="Pick a dataset for the task, e.g. stsb-dev (embedding), sst2-dev (text-classification), "
            "mnist-test (image-classification), tinystories (causal-lm).",
        )
    if limit is not None:
        ds = ds.head(limit)
    return ds
