"""Dataset shapes the tasks understand.

Each task needs one kind: sentence pairs with a score (embedding), labeled texts
(text-classification), labeled images (image-classification) or a text corpus (causal-lm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass
class PairDataset:
    """Sentence pairs with a gold similarity score (STS-B style)."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)

    def texts(self) -> list[str]:
        """Every distinct sentence, in first-seen order."""
        return list(dict.fromkeys(self.sentences1 + self.sentences2))

    def head(self, n: int) -> PairDataset:
        return PairDataset(self.name, self.sentences1[:n], self.sentences2[:n], self.scores[:n])


@dataclass
class LabeledTextDataset:
    """Texts with integer labels; ``label_names[i]`` names label ``i``."""

    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int) -> LabeledTextDataset:
        return LabeledTextDataset(self.name, self.texts[:n], self.labels[:n], self.label_names)


@dataclass
class ImageDataset:
    """Images as uint8 arrays [N, H, W] or [N, C, H, W] with integer labels."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    label_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int) -> ImageDataset:
        return ImageDataset(self.name, self.images[:n], self.labels[:n], self.label_names)


@dataclass
class TextCorpus:
    """Raw text for language modelling.

    ``mode="documents"``: each document is scored on its own, starting from BOS.
    ``mode="stream"``: the documents are joined and scored with a sliding window.
    """

    name: str
    documents: list[str]
    mode: Literal["documents", "stream"] = "documents"

    def __len__(self) -> int:
        return len(self.documents)

    def head(self, n: int) -> TextCorpus:
        return TextCorpus(self.name, self.documents[:n], self.mode)

    def texts(self) -> list[str]:
        return self.documents


Dataset = PairDataset | LabeledTextDataset | ImageDataset | TextCorpus
