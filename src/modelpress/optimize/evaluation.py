"""Quality of variants against their original, with the original's outputs computed once.

Recipes and the tuner evaluate many variants of one model on one dataset. The original's
metrics and its outputs (what agreement is measured against) do not change, so the
:class:`Evaluator` measures them once and replays the original's outputs from a cache keyed by
the exact input batch.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import Artifact
from modelpress.runtimes import create_runner
from modelpress.tasks import task_for

REFERENCE_RUNTIME = "torch"  # the original is scored as its authors run it: PyTorch fp32 eager


def _batch_key(batch: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(batch):
        arr = np.ascontiguousarray(batch[name])
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


class CachedRunner:
    """A runner whose outputs are remembered per input batch (for a model that does not change)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self._cache: dict[str, dict[str, np.ndarray]] = {}
        self.hits = 0

    def __getattr__(self, name: str) -> Any:  # signature, name, artifact, describe, ...
        return getattr(self.runner, name)

    def load(self) -> CachedRunner:
        self.runner.load()
        return self

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = _batch_key(batch)
        if key in self._cache:
            self.hits += 1
            return self._cache[key]
        out = self.runner.run(batch)
        self._cache[key] = out
        return out


class Evaluator:
    """Scores variants of ``original`` on one dataset, and their agreement with it."""

    def __init__(
        self,
        original: Artifact,
        *,
        data: str | Path | None = None,
        data_dir: Path | None = None,
        limit: int | None = None,
        threads: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        from modelpress.datasets import load_dataset

        self.original = original
        self.task = task_for(original)
        self.dataset = load_dataset(data or self.task.default_dataset, self.task.dataset_kind, data_dir_=data_dir, limit=limit)
        self.threads = threads
        self.kwargs = {"batch_size": batch_size} if batch_size else {}
        self.reference = CachedRunner(create_runner(original, REFERENCE_RUNTIME, threads=threads))
        self._original_result: dict[str, Any] | None = None

    @property
    def dataset_name(self) -> str:
        return self.dataset.name

    def original_result(self) -> dict[str, Any]:
        if self._original_result is None:
            t0 = time.perf_counter()
            self.reference.load()
            metrics = self.task.evaluate(self.reference, self.dataset, **self.kwargs)
            self._original_result = self._result(self.original, REFERENCE_RUNTIME, metrics, None, time.perf_counter() - t0, self.reference)
        return self._original_result

    def evaluate(self, artifact: Artifact, runtime: str) -> dict[str, Any]:
        """The variant's metrics and its agreement with the original, as ``api.evaluate`` reports them."""
        t0 = time.perf_counter()
        runner = CachedRunner(create_runner(artifact, runtime, threads=self.threads))
        runner.load()
        try:
            metrics = self.task.evaluate(runner, self.dataset, **self.kwargs)
            agreement = self.task.agreement(runner, self.reference, self.dataset, **self.kwargs)
        finally:
            runner.runner.close()
        return self._result(artifact, runtime, metrics, agreement, time.perf_counter() - t0, runner)

    def _result(self, art: Artifact, runtime: str, metrics: dict, agreement: dict | None, seconds: float, runner: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": art.name,
            "task": self.task.name,
            "dataset": self.dataset.name,
            "runtime": runtime,
            "runtime_options": runner.describe(),
            "metrics": metrics,
            "primary_metric": self.task.primary_metric,
            "seconds": seconds,
        }
        if agreement is not None:
            out["agreement"] = agreement
            out["reference"] = {"model": self.original.name, "runtime": REFERENCE_RUNTIME}
        return out
