"""Image classification: uint8 images -> normalised float tensors -> logits -> labels; accuracy.

Fidelity (``agreement_metric``): ``label_agreement``, the share of images on which a variant
predicts the original's label (as for text classification).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import Signature, TensorSpec
from modelpress.datasets.base import ImageDataset
from modelpress.errors import InvalidInputError
from modelpress.tasks.base import Progress, _noop, register_task
from modelpress.tasks.text_classification import ClassifierTask, classification_metrics, softmax

# MNIST's pixel mean and standard deviation (of x / 255), the usual normalisation for it.
MNIST_DEFAULTS = {"mean": [0.1307], "std": [0.3081], "channels": 1, "height": 28, "width": 28, "labels": [str(i) for i in range(10)]}


@register_task
class ImageClassificationTask(ClassifierTask):
    name = "image-classification"
    dataset_kind = ImageDataset
    default_dataset = "mnist-test"
    primary_metric = "accuracy"
    default_batch_size = 256

    def __init__(self, config: dict[str, Any] | None = None, tokenizer: Any = None) -> None:
        merged = dict(MNIST_DEFAULTS)
        merged.update(config or {})
        super().__init__(merged, None)

    @classmethod
    def uses_tokenizer(cls) -> bool:
        return False

    @classmethod
    def auto_model_class(cls):
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification

    @classmethod
    def config_from_hf(cls, folder: Path, hf_config: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            p = json.loads(pre.read_text())
            if "image_mean" in p:
                cfg["mean"], cfg["std"] = list(p["image_mean"]), list(p["image_std"])
            size = p.get("size", {})
            if isinstance(size, dict) and "height" in size:
                cfg["height"], cfg["width"] = size["height"], size["width"]
            elif isinstance(size, int):
                cfg["height"] = cfg["width"] = size
        cfg["channels"] = getattr(hf_config, "num_channels", 3)
        id2label = getattr(hf_config, "id2label", {}) or {}
        cfg["labels"] = [str(id2label[i]) for i in sorted(id2label)]
        return cfg

    def signature(self, hf_config: Any = None) -> Signature:
        c = self.config
        return Signature(
            inputs=[TensorSpec(name="pixel_values", dtype="float32", shape=["batch", c["channels"], c["height"], c["width"]])],
            outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", len(c["labels"]) or "labels"])],
        )

    def wrap_module(self, hf_model: Any):
        from modelpress.tasks._wrappers import ImageLogits

        return ImageLogits(hf_model)

    def preprocess(self, inputs: Sequence[Any] | np.ndarray) -> dict[str, np.ndarray]:
        c = self.config
        try:
            x = np.asarray(inputs)
        except ValueError as exc:
            raise InvalidInputError(f"Images must all have one shape: {exc}") from exc
        if x.size == 0:
            raise InvalidInputError("No images were given.", hint=f"Send an array of shape [N, {c['height']}, {c['width']}].")
        if x.ndim == 3 and c["channels"] == 1:
            x = x[:, None]
        expected = (c["channels"], c["height"], c["width"])
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise InvalidInputError(
                f"Images have shape {list(x.shape)}; this model takes [N, {', '.join(map(str, expected))}].",
                hint=f"Send uint8 pixels shaped [N, {c['height']}, {c['width']}] (grey) or [N, C, H, W].",
            )
        x = x.astype(np.float32)
        if np.issubdtype(np.asarray(inputs).dtype, np.integer):
            x /= 255.0
        mean = np.asarray(c["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(c["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        return {"pixel_values": np.ascontiguousarray((x - mean) / std, dtype=np.float32)}

    def postprocess(self, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        probs = softmax(outputs["logits"])
        labels = self.config.get("labels") or [str(i) for i in range(probs.shape[-1])]
        return [{"label": labels[int(p.argmax())], "label_id": int(p.argmax()), "scores": p.tolist()} for p in probs]

    def sample_raw(self, n: int, data_dir: Path | None = None) -> np.ndarray:
        if data_dir is not None and (data_dir / "mnist/t10k-images-idx3-ubyte.gz").is_file() and self.config["channels"] == 1:
            from modelpress.datasets.local import _idx

            images = _idx(data_dir / "mnist/t10k-images-idx3-ubyte.gz")
            if images.shape[1:] == (self.config["height"], self.config["width"]):
                return images[np.arange(n) % len(images)]
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, size=(n, self.config["channels"], self.config["height"], self.config["width"]), dtype=np.uint8)

    def sample_inputs(self, batch_size: int, seq_len: int | None = None, data_dir: Path | None = None) -> dict[str, np.ndarray]:
        return self.preprocess(self.sample_raw(batch_size, data_dir))

    def predict_ids(self, runner: Any, images: np.ndarray, *, batch_size: int = 256, progress: Progress = _noop) -> np.ndarray:
        pred = np.zeros(len(images), dtype=np.int64)
        for start in range(0, len(images), batch_size):
            batch = self.preprocess(images[start : start + batch_size])
            pred[start : start + batch_size] = runner.run(batch)["logits"].argmax(-1)
            progress(min(batch_size, len(images) - start))
        return pred

    def agreement_inputs(self, dataset: ImageDataset) -> np.ndarray:
        return dataset.images

    def evaluate(self, runner: Any, dataset: ImageDataset, *, batch_size: int = 256, progress: Progress = _noop) -> dict[str, float]:
        self.check_dataset(dataset)
        pred = self.predict_ids(runner, dataset.images, batch_size=batch_size, progress=progress)
        n_classes = max(len(self.config.get("labels") or []), len(dataset.label_names))
        return classification_metrics(pred, np.asarray(dataset.labels), n_classes)
