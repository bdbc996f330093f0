"""Sentence embeddings: encoder hidden states, pooled and normalised as the model says.

Quality: Spearman correlation between the cosine similarity of the two sentences' embeddings
and the gold scores (STS-B), the figure sentence-transformers reports; and agreement with a
reference model on any texts (mean and min cosine, top-10 nearest-neighbour overlap).

Fidelity (``agreement_metric``) is the mean cosine between a variant's and the original's
embedding of each text, not the top-10 overlap, because:

* it is a measure of one row: a shadow copy in the server scores each request with it, and the
  mean over a dataset's rows is exactly the offline figure, so the gate, the tuner's front and
  a rollout's shadow statistics speak of one number; top-10 overlap depends on which other texts
  are in the set (a request of three texts has no ten neighbours) and needs more than ten texts;
* it is continuous: top-10 overlap moves in steps of 0.1 per text and ties variants (int8 and
  bf16 of MiniLM) that cosine tells apart.

``min_cosine`` and ``top10_agreement`` are still reported, and a gate may name them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import Signature, TensorSpec
from modelpress.datasets.base import PairDataset
from modelpress.errors import ConfigError, TaskMismatchError
from modelpress.tasks.base import Progress, _noop, batched_by_length, register_task
from modelpress.tasks.text import TextInputTask, check_texts, text_input_specs

POOLING_MODES = ("mean", "cls", "max", "lasttoken")
TOP_K = 10


def read_sentence_transformers_config(folder: Path) -> dict[str, Any]:
    """Pooling, normalisation and max length from a sentence-transformers folder (if it is one)."""
    out: dict[str, Any] = {}
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return out
    modules = json.loads(modules_file.read_text())
    out["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            pool = json.loads((folder / m["path"] / "config.json").read_text())
            for mode in POOLING_MODES:
                key = (
                    "pooling_mode_cls_token"
                    if mode == "cls"
                    else f"pooling_mode_{mode}_tokens"
                    if mode != "lasttoken"
                    else "pooling_mode_lasttoken"
                )
                if pool.get(key):
                    out["pooling"] = mode
                    break
    bert_cfg = folder / "sentence_bert_config.json"
    if bert_cfg.is_file():
        msl = json.loads(bert_cfg.read_text()).get("max_seq_length")
        if msl:
            out["max_length"] = int(msl)
    return out


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
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
    raise TaskMismatchError(f"Unknown pooling '{mode}'.", hint=f"Use one of {', '.join(POOLING_MODES)}.")


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def _matrix(rows: Sequence[Any] | np.ndarray) -> np.ndarray:
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        return rows.astype(np.float64, copy=False)
    return np.stack([np.asarray(r, dtype=np.float64).ravel() for r in rows]) if len(rows) else np.zeros((0, 0))


def cosines(a: Sequence[Any] | np.ndarray, b: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (0 for an all-zero row)."""
    x, y = _matrix(a), _matrix(b)
    if x.shape != y.shape:
        raise ConfigError(
            f"Embeddings of different shapes cannot be compared: {x.shape} and {y.shape}.",
            hint="Compare a candidate with the same output width (the same number of texts, the same hidden size).",
        )
    return (normalize(x) * normalize(y)).sum(1)


def agreement_metrics(a: np.ndarray, b: np.ndarray, k: int = TOP_K) -> dict[str, float]:
    """How closely embeddings ``a`` follow reference embeddings ``b`` of the same texts."""
    cos = cosines(a, b)
    out = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
    an, bn = normalize(a.astype(np.float64)), normalize(b.astype(np.float64))
    n = an.shape[0]
    if n > k:
        sims_a, sims_b = an @ an.T, bn @ bn.T
        np.fill_diagonal(sims_a, -np.inf)
        np.fill_diagonal(sims_b, -np.inf)
        top_a = np.argpartition(-sims_a, k, axis=1)[:, :k]
        top_b = np.argpartition(-sims_b, k, axis=1)[:, :k]
        overlap = [len(set(top_a[i]) & set(top_b[i])) / k for i in range(n)]
        out[f"top{k}_agreement"] = float(np.mean(overlap))
    return out


@register_task
class EmbeddingTask(TextInputTask):
    name = "embedding"
    dataset_kind = PairDataset
    default_dataset = "stsb-dev"
    primary_metric = "spearman"
    agreement_metric = "mean_cosine"  # why not top-10 overlap: see the module docstring
    agreement_metrics = ("mean_cosine", "min_cosine", f"top{TOP_K}_agreement")

    @classmethod
    def auto_model_class(cls):
        from transformers import AutoModel

        return AutoModel

    @classmethod
    def config_from_hf(cls, folder: Path, hf_config: Any) -> dict[str, Any]:
        cfg = {"pooling": "mean", "normalize": False}
        cfg.update(read_sentence_transformers_config(folder))
        cfg["hidden_size"] = getattr(hf_config, "hidden_size", None)
        return cfg

    def signature(self, hf_config: Any = None) -> Signature:
        hidden = getattr(hf_config, "hidden_size", None) or self.config.get("hidden_size") or "hidden"
        return Signature(
            inputs=text_input_specs(self.tokenizer),
            outputs=[TensorSpec(name="last_hidden_state", dtype="float32", shape=["batch", "sequence", hidden])],
        )

    def wrap_module(self, hf_model: Any):
        from modelpress.tasks._wrappers import EncoderOutput

        return EncoderOutput(hf_model, "last_hidden_state")

    def postprocess(self, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> np.ndarray:
        emb = pool(outputs["last_hidden_state"], batch["attention_mask"], self.config.get("pooling", "mean"))
        return normalize(emb) if self.config.get("normalize") else emb

    def embed(self, runner: Any, texts: Sequence[str], *, batch_size: int = 32, progress: Progress = _noop) -> np.ndarray:
        """Embeddings of ``texts`` in their order, batched by length to keep padding small."""
        texts = check_texts(texts)
        lengths = self.encoder.lengths(texts)
        out: list[np.ndarray | None] = [None] * len(texts)
        for idx in batched_by_length(texts, lengths, batch_size):
            batch = self.preprocess([texts[i] for i in idx])
            emb = self.postprocess(runner.run(batch), batch)
            for j, i in enumerate(idx):
                out[i] = emb[j]
            progress(len(idx))
        return np.stack(out)  # type: ignore[arg-type]

    def eval_size(self, dataset: PairDataset) -> int:
        return len(dataset.texts())

    def evaluate(self, runner: Any, dataset: PairDataset, *, batch_size: int = 32, progress: Progress = _noop) -> dict[str, float]:
        from scipy.stats import pearsonr, spearmanr

        self.check_dataset(dataset)
        texts = dataset.texts()
        emb = normalize(self.embed(runner, texts, batch_size=batch_size, progress=progress).astype(np.float64))
        where = {t: i for i, t in enumerate(texts)}
        a = emb[[where[s] for s in dataset.sentences1]]
        b = emb[[where[s] for s in dataset.sentences2]]
        cos = (a * b).sum(1)
        gold = np.asarray(dataset.scores, dtype=np.float64)
        return {
            "spearman": float(spearmanr(cos, gold).statistic),
            "pearson": float(pearsonr(cos, gold).statistic),
            "pairs": float(len(gold)),
        }

    def agreement(self, runner: Any, reference: Any, dataset: Any, *, batch_size: int = 32) -> dict[str, float]:
        texts = dataset.texts()
        a = self.embed(runner, texts, batch_size=batch_size)
        b = self.embed(reference, texts, batch_size=batch_size)
        return agreement_metrics(a, b)

    @classmethod
    def agreement_rows(cls, original: Sequence[Any], variant: Sequence[Any]) -> np.ndarray:
        """The cosine of each text's two embeddings (in [-1, 1]: opposed vectors give -1, not 0, so
        the mean over rows is ``mean_cosine`` exactly)."""
        cls.check_rows(original, variant)
        return cosines(original, variant) if len(original) else np.zeros(0)
