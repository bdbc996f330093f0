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
from typing import Any, ClassVar, Protocol

import numpy as np

from modelpress.artifacts import Artifact, Signature
from modelpress.errors import ConfigError, DatasetError, TaskMismatchError, UnknownTaskError

Progress = Callable[[int], None]  # called with how many items were just done


class Runner(Protocol):
    """What a task needs of a model: ``run(batch) -> outputs`` (NumPy arrays named as the signature says).

    Every :class:`modelpress.runtimes.Runner` is one; tasks never import the runtimes, so this
    structural type is all they know of them.
    """

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _noop(_: int) -> None:
    return None


class Task(ABC):
    """Base class of the tasks. Subclasses set ``name`` and ``dataset_kind``.

    Fidelity (how closely a variant follows the original model) is the task's too:
    ``agreement_metric`` names the one number that says it (the gate's ``--min-agreement``, the
    tuner's quality axis and the shadow statistics all read it from here), ``agreement_metrics``
    every number :meth:`agreement` reports, and :meth:`agreement_rows` measures it row by row on
    two models' results for the same inputs (what a shadow copy in the server compares). The
    mean of :meth:`agreement_rows` over a dataset's rows is ``agreement_metric`` of
    :meth:`agreement` on it.
    """

    name: ClassVar[str]
    dataset_kind: ClassVar[type]
    default_dataset: ClassVar[str]
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    agreement_metric: ClassVar[str]
    agreement_metrics: ClassVar[tuple[str, ...]]

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
    def sample_raw(self, n: int, data_dir: Path | None = None) -> Any:
        """``n`` realistic raw inputs (real sentences where the data folder is present; an image array)."""

    def sample_inputs(self, batch_size: int, seq_len: int | None = None, data_dir: Path | None = None) -> dict[str, np.ndarray]:
        """One model batch built from real raw inputs (padded or cut to ``seq_len`` for text)."""
        return self.preprocess(self.sample_raw(batch_size, data_dir))

    # -- quality ---------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, runner: Runner, dataset: Any, *, batch_size: int = 32, progress: Progress = _noop) -> dict[str, float]:
        """Score the model behind ``runner`` on ``dataset``."""

    def agreement(self, runner: Runner, reference: Runner, dataset: Any, *, batch_size: int = 32) -> dict[str, float]:
        """How closely ``runner`` follows ``reference`` (the original model) on ``dataset``.

        The keys are ``agreement_metrics``; ``agreement_metric`` is among them.
        """
        raise TaskMismatchError(f"Task '{self.name}' has no agreement measure.")

    @classmethod
    def agreement_rows(cls, original: Sequence[Any], variant: Sequence[Any]) -> np.ndarray:
        """One agreement value per row: ``original`` and ``variant`` are two models' results
        (what :meth:`postprocess` returns, one per input) for the same inputs, in order.
        """
        raise TaskMismatchError(f"Task '{cls.name}' has no agreement measure.")

    @staticmethod
    def check_rows(original: Sequence[Any], variant: Sequence[Any]) -> None:
        """Both sides answered the same number of rows (the shared check of :meth:`agreement_rows`)."""
        if len(original) != len(variant):
            raise ConfigError(
                f"The primary answered {len(original)} rows and the candidate {len(variant)}.",
                hint="Compare the two models' results for the same inputs, one result per input.",
            )

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


def same_key_rows(task: str, key: str, example: str, original: Sequence[Any], variant: Sequence[Any]) -> np.ndarray:
    """1.0 where both results (``postprocess`` dicts) hold the same ``key`` (a label id, the next
    token), else 0.0; ``example``: one valid result, for the error when a result has no ``key``."""
    rows = []
    for o, v in zip(original, variant, strict=True):
        if not (isinstance(o, dict) and isinstance(v, dict) and key in o and key in v):
            keys = sorted(o) if isinstance(o, dict) else type(o).__name__
            raise ConfigError(
                f"The {task} results cannot be compared: they have no {key} (got {keys}).",
                hint=f"Compare postprocess() results, e.g. [{example}].",
            )
        rows.append(float(o[key] == v[key]))
    return np.asarray(rows, dtype=np.float64)


def load_tokenizer(artifact: Artifact):
    from transformers import AutoTokenizer

    where = artifact.manifest.task_config.get("tokenizer") or (str(artifact.path) if artifact.path else None)
    if where is None:
        raise TaskMismatchError(
            f"Task '{artifact.task}' needs a tokenizer and none was given for this in-memory model.",
            hint="Pass task_config={'tokenizer': 'path/to/hf-folder'} (or --tokenizer DIR).",
        )
    path = Path(where)
    if not path.is_absolute() and artifact.path is not None:
        path = artifact.path / path  # a manifest's relative path is inside the artifact folder, not the working directory
    if path.is_file():
        path = path.parent
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
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
