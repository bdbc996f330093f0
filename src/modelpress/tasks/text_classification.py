"""Text classification: logits -> softmax -> labels; accuracy (and macro-F1 for >2 classes).

Fidelity (``agreement_metric``): ``label_agreement``, the share of inputs on which a variant
predicts the original's label; what a classifier's user sees is the label, so that is what must
not change (the scores may move a little without changing one answer).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from modelpress.artifacts import Signature, TensorSpec
from modelpress.datasets.base import LabeledTextDataset
from modelpress.errors import TaskMismatchError
from modelpress.tasks.base import Progress, Task, _noop, batched_by_length, register_task, same_key_rows
from modelpress.tasks.text import TextInputTask, text_input_specs


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def classification_metrics(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, and macro-F1 when there are more than two classes."""
    out = {"accuracy": float((pred == gold).mean()), "examples": float(len(gold))}
    if num_classes > 2:
        f1s = []
        for c in range(num_classes):
            tp = float(((pred == c) & (gold == c)).sum())
            fp = float(((pred == c) & (gold != c)).sum())
            fn = float(((pred != c) & (gold == c)).sum())
            f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        out["macro_f1"] = float(np.mean(f1s))
    return out


def label_agreement_rows(task: str, original: Sequence[Any], variant: Sequence[Any]) -> np.ndarray:
    """1.0 where both results (``postprocess`` dicts) hold the same ``label_id``, else 0.0."""
    return same_key_rows(task, "label_id", '{"label": "positive", "label_id": 1, "scores": [...]}', original, variant)


class ClassifierTask(Task):
    """A classifier (of texts or images): its fidelity is how often a variant predicts the original's label."""

    agreement_metric = "label_agreement"
    agreement_metrics = ("label_agreement",)
    default_batch_size: ClassVar[int] = 32

    @abstractmethod
    def predict_ids(self, runner: Any, inputs: Any, *, batch_size: int = 32, progress: Progress = _noop) -> np.ndarray:
        """The predicted label id of each input."""

    @abstractmethod
    def agreement_inputs(self, dataset: Any) -> Any:
        """The inputs of ``dataset`` that :meth:`agreement` classifies with both models."""

    def agreement(self, runner: Any, reference: Any, dataset: Any, *, batch_size: int | None = None) -> dict[str, float]:
        """``label_agreement``: the share of inputs on which ``runner`` predicts ``reference``'s label."""
        size = batch_size or self.default_batch_size
        inputs = self.agreement_inputs(dataset)
        a = self.predict_ids(runner, inputs, batch_size=size)
        b = self.predict_ids(reference, inputs, batch_size=size)
        return {"label_agreement": float((a == b).mean())}

    @classmethod
    def agreement_rows(cls, original: Sequence[Any], variant: Sequence[Any]) -> np.ndarray:
        cls.check_rows(original, variant)
        return label_agreement_rows(cls.name, original, variant)


def map_labels(model_labels: list[str], dataset: Any) -> np.ndarray:
    """Dataset label ids -> model label ids: by name where the names match, else by position."""
    names = [n.lower() for n in dataset.label_names]
    mlabels = [m.lower() for m in model_labels]
    gold = np.asarray(dataset.labels, dtype=np.int64)
    if names and set(names) <= set(mlabels):
        return np.asarray([mlabels.index(names[g]) for g in gold], dtype=np.int64)
    n_data = max(len(names), int(gold.max()) + 1 if len(gold) else 0)
    if n_data > len(model_labels):
        raise TaskMismatchError(
            f"Dataset '{dataset.name}' has {n_data} classes but the model predicts {len(model_labels)} ({', '.join(model_labels)}).",
            hint="Evaluate on a dataset with the model's classes, or fine-tune a head with that many labels.",
        )
    return gold


@register_task
class TextClassificationTask(ClassifierTask, TextInputTask):
    name = "text-classification"
    dataset_kind = LabeledTextDataset
    default_dataset = "sst2-dev"
    primary_metric = "accuracy"

    @classmethod
    def auto_model_class(cls):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    @classmethod
    def config_from_hf(cls, folder: Path, hf_config: Any) -> dict[str, Any]:
        id2label = getattr(hf_config, "id2label", None) or {}
        n = getattr(hf_config, "num_labels", len(id2label))
        return {"labels": [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]}

    @property
    def labels(self) -> list[str]:
        return list(self.config.get("labels") or [])

    def signature(self, hf_config: Any = None) -> Signature:
        n = len(self.labels) or "labels"
        return Signature(inputs=text_input_specs(self.tokenizer), outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", n])])

    def wrap_module(self, hf_model: Any):
        from modelpress.tasks._wrappers import EncoderOutput

        return EncoderOutput(hf_model, "logits")

    def postprocess(self, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        probs = softmax(outputs["logits"])
        labels = self.labels or [f"LABEL_{i}" for i in range(probs.shape[-1])]
        return [{"label": labels[int(p.argmax())], "label_id": int(p.argmax()), "scores": p.tolist()} for p in probs]

    def predict_ids(self, runner: Any, texts: list[str], *, batch_size: int = 32, progress: Progress = _noop) -> np.ndarray:
        lengths = self.encoder.lengths(texts)
        pred = np.zeros(len(texts), dtype=np.int64)
        for idx in batched_by_length(texts, lengths, batch_size):
            batch = self.preprocess([texts[i] for i in idx])
            pred[idx] = runner.run(batch)["logits"].argmax(-1)
            progress(len(idx))
        return pred

    def evaluate(self, runner: Any, dataset: LabeledTextDataset, *, batch_size: int = 32, progress: Progress = _noop) -> dict[str, float]:
        self.check_dataset(dataset)
        labels = self.labels or [str(i) for i in range(len(dataset.label_names))]
        gold = map_labels(labels, dataset)
        pred = self.predict_ids(runner, dataset.texts, batch_size=batch_size, progress=progress)
        return classification_metrics(pred, gold, max(len(labels), len(dataset.label_names)))

    def agreement_inputs(self, dataset: LabeledTextDataset) -> list[str]:
        return dataset.texts
