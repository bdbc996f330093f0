"""Fixtures the optimize tests share: MiniLM's reference on STS-B, computed once per session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import modelpress as mp

STSB_PAIRS = 500  # the first STS-B dev pairs: enough for a stable Spearman, a few seconds to embed


@dataclass
class MinilmReference:
    """MiniLM, the first STS-B pairs, and the fp32 embeddings of their sentences.

    The fp32 ONNX export stands in for PyTorch eager: the export is checked to match it to 1e-3
    relative, and it runs faster on these 2 cores.
    """

    art: Any
    ds: Any
    texts: list[str]
    emb: np.ndarray

    def spearman(self, emb: np.ndarray) -> float:
        """Spearman of the pairs' cosine with the gold scores (what EmbeddingTask.evaluate computes)."""
        from scipy.stats import spearmanr

        from modelpress.tasks.embedding import normalize

        where = {t: i for i, t in enumerate(self.texts)}
        e = normalize(emb.astype(np.float64))
        cos = (e[[where[t] for t in self.ds.sentences1]] * e[[where[t] for t in self.ds.sentences2]]).sum(1)
        return float(spearmanr(cos, np.asarray(self.ds.scores, dtype=np.float64)).statistic)

    def embed(self, art: Any, runtime: str | None = None) -> np.ndarray:
        """The sentences' embeddings by ``art`` on ``runtime`` (its manifest's when None)."""
        runner = mp.create_runner(art, runtime, threads=2)
        try:
            return mp.task_for(art).embed(runner, self.texts)
        finally:
            runner.close()


@pytest.fixture(scope="session")
def minilm_reference(data_dir) -> MinilmReference:
    from modelpress.datasets import load_dataset

    art = mp.load("minilm")
    ds = load_dataset("stsb-dev", data_dir_=data_dir, limit=STSB_PAIRS)
    texts = ds.texts()
    ref = MinilmReference(art, ds, texts, np.empty(0))
    ref.emb = ref.embed(art, "onnxruntime")
    return ref
