"""What a model does, and how to measure it.

A :class:`Task` turns requests into model inputs and model outputs into responses, makes sample
inputs (for export tracing, calibration and benchmarks), and scores quality on a dataset. It
knows nothing about optimization, registries or servers: it talks to a model only through a
runner's ``run(batch) -> outputs``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from modelpress.artifacts import Signature
from modelpress.errors import DatasetError, TaskMismatchError, UnknownTaskError

if TYPE_CHECKING:  # pragma: no cover
    from modelpress.artifacts import Artifact
    from modelpress.runtimes.base import Runner

Progress = Callable[[int], None]  # called with how many items were just done


def _noop(_: int) -> None:
    return None


class Task(ABC):
    """Base class of the tasks. Subclasses set ``name`` and ``dataset_kind``."""

    name: ClassVar[str]
    dataset_kind: ClassVar[type]
    default_dataset: ClassVar[str]
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True

    def __init__(self, config: dict[str, Any] | None = None, tokenizer: Any = None) -> None:
        self.config: dict[str, Any] = dict(config or {})
        self.tokenizer = tokenizer

    # -- building ---------------------------------------------------------------------
    @classmethod
    def config_from_hf(cls, folder: Path, hf_config: Any) -> dict[str, Any]:
        """Task settings read from a Hugging Face folder (pooling, labels, ...)."""
        return {}

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> Task:
        tok = None
        if cls.uses_tokenizer():
            tok = load_tokenizer(artifact)
        return cls(artifact.manifest.task_config, tok)

    @classmethod
    def uses_tokenizer(cls) -> bool:
        return True

    @classmethod
    def auto_model_class(cls):  # the transformers Auto class that loads this task's models
        raise TaskMismatchError(f"Task '{cls.name}' has no Hugging Face loader.")

    @abstractmethod
    def signature(self, hf_config: Any = None) -> Signature:
        """Inputs and outputs of this task's models (dynamic axes named)."""

    def wrap_module(self, hf_model: Any):
        """A torch module taking the signature's inputs positionally and returning its outputs."""
        raise TaskMismatchError(f"Task '{self.name}' cannot wrap a Hugging Face model.")

    # -- requests --------------------------------------------------------------------
    @abstractmethod
    def preprocess(self, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
        """Raw inputs (texts, images) to one model batch."""

    @abstractmethod
    def postprocess(self, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> Any:
        """One batch of model outputs to task results."""

    @abstractmethod
    def sample_raw(self, n: int, data_dir: Path | None = None) -> list[Any]:
        """``n`` realistic raw inputs (real sentences where the data folder is present)."""

    def sample_inputs(self, batch_size: int, seq_len: int | None = None, data_dir: Path | None = None) -> dict[str, np.ndarray]:
        """One model batch built from real raw inputs (padded or cut to ``seq_len`` for text)."""
        return self.preprocess(self.sample_raw(batch_size, data_dir))

    # -- quality ---------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, runner: Runner, dataset: Any, *, batch_size: int = 32, progress: Progress = _noop) -> dict[str, float]:
        """Score the model behind ``runner`` on ``dataset``."""

    def agreement(self, runner: Runner, reference: Runner, dataset: Any, *, batch_size: int = 32) -> dict[str, float]:
        """How closely ``runner`` follows ``reference`` (the original model) on ``dataset``."""
        raise TaskMismatchError(f"Task '{self.name}' has no agreement measure.")

    def eval_size(self, dataset: Any) -> int:
        """How many items evaluate() will process (for progress bars)."""
        return len(dataset)

    def check_dataset(self, dataset: Any) -> None:
        if not isinstance(dataset, self.dataset_kind):
            raise DatasetError(
                f"Dataset '{getattr(dataset, 'name', dataset)}' holds {type(dataset).__name__}, "
                f"but task '{self.name}' needs {self.dataset_kind.__name__}.",
                hint=f"Use a dataset made for this task, e.g. --data {self.default_dataset}.",
            )


def load_tokenizer(artifact: Artifact):
    from transformers import AutoTokenizer

    where = artifact.manifest.task_config.get("tokenizer") or (str(artifact.path) if artifact.path else None)
    if where is None:
        raise TaskMismatchError(
            f"Task '{artifact.task}' needs a tokenizer and none was given for this in-memory model.",
            hint="Pass task_config={'tokenizer': 'path/to/hf-folder'} (or --tokenizer DIR).",
        )
    path = Path(where)
    if path.is_file():
        path = path.parent
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise TaskMismatchError(
            f"No tokenizer could be loaded from '{path}' for task '{artifact.task}': {exc}",
            hint="Point --tokenizer at a Hugging Face folder with tokenizer.json or vocab.txt.",
        ) from exc


def batched_by_length(items: Sequence[Any], lengths: Sequence[int], batch_size: int) -> Iterable[list[int]]:
    """Indices in batches of similar length (longest first), so padding stays small."""
    order = sorted(range(len(items)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def get_task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise UnknownTaskError(
            f"Unknown task '{name}'.",
            hint=f"Known tasks: {', '.join(sorted(TASKS))}. Example: --task embedding",
        )
    return TASKS[name]
