"""Readers for a user's own files: CSV, TSV, JSONL, plain text and NumPy ``.npz``.

Which columns are needed depends on the dataset kind the task asks for:

* pairs (embedding): ``sentence1``, ``sentence2``, ``score``
* labeled text (text-classification): ``text`` (or ``sentence``) and ``label``
* corpus (causal-lm): a ``.txt`` file, or a ``text`` column
* images (image-classification): an ``.npz`` with ``images`` (uint8) and ``labels``

``columns`` renames: ``{"sentence1": "question", "label": "y"}`` reads column ``question``
as ``sentence1`` and ``y`` as ``label``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.datasets.base import Dataset, ImageDataset, LabeledTextDataset, PairDataset, TextCorpus
from modelpress.errors import DatasetError

ALIASES = {"text": ["text", "sentence", "question", "content"], "label": ["label", "labels", "target", "class"]}


def _rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc.msg}).") from exc
        return rows
    delimiter = "\t" if suffix in (".tsv", ".tab") else ","
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


def _column(rows: list[dict[str, Any]], want: str, columns: dict[str, str], path: Path, example: str) -> list[Any]:
    names = [columns[want]] if want in columns else ALIASES.get(want, [want])
    have = list(rows[0].keys()) if rows else []
    for name in names:
        if name in have:
            return [r[name] for r in rows]
    raise DatasetError(
        f"{path} has no column '{names[0]}' (columns found: {', '.join(map(str, have)) or 'none'}).",
        hint=f"Name the columns in the file, e.g. a header '{example}', or map them with --columns {want}=YOUR_COLUMN.",
    )


def _labels(raw: list[Any]) -> tuple[list[int], list[str]]:
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in raw):
        ints = [int(v) for v in raw]
        return ints, [str(i) for i in range(max(ints) + 1)]
    names = sorted({str(v) for v in raw})
    return [names.index(str(v)) for v in raw], names


def read_file(path: str | Path, kind: type, columns: dict[str, str] | None = None) -> Dataset:
    path = Path(path)
    columns = columns or {}
    if not path.is_file():
        raise DatasetError(f"The data file '{path}' does not exist.", hint="Pass an existing CSV, TSV, JSONL, TXT or NPZ file.")
    if kind is TextCorpus and path.suffix.lower() in (".txt", ".raw", ".text"):
        return TextCorpus(path.stem, [path.read_text(encoding="utf-8", errors="replace")], "stream")
    if kind is ImageDataset:
        if path.suffix.lower() != ".npz":
            raise DatasetError(
                f"Images are read from .npz files; '{path.name}' is not one.",
                hint="Save with numpy.savez(path, images=uint8_array, labels=int_array).",
            )
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz or "labels" not in npz:
                raise DatasetError(f"{path} needs arrays 'images' and 'labels'; it has {sorted(npz.files)}.")
            return ImageDataset(path.stem, npz["images"], npz["labels"].astype(np.int64))
    rows = _rows(path)
    if not rows:
        raise DatasetError(f"{path} holds no rows.")
    if kind is PairDataset:
        ex = "sentence1,sentence2,score"
        s1 = [str(v) for v in _column(rows, "sentence1", columns, path, ex)]
        s2 = [str(v) for v in _column(rows, "sentence2", columns, path, ex)]
        try:
            scores = [float(v) for v in _column(rows, "score", columns, path, ex)]
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: the score column holds a value that is not a number ({exc}).") from exc
        return PairDataset(path.stem, s1, s2, scores)
    if kind is LabeledTextDataset:
        texts = [str(v) for v in _column(rows, "text", columns, path, "text,label")]
        labels, names = _labels(_column(rows, "label", columns, path, "text,label"))
        return LabeledTextDataset(path.stem, texts, labels, names)
    if kind is TextCorpus:
        return TextCorpus(path.stem, [str(v) for v in _column(rows, "text", columns, path, "text")], "documents")
    raise DatasetError(f"No reader for {kind.__name__} from {path.name}.")
