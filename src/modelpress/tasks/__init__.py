"""Tasks: what a model does and how its quality is measured."""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelpress.tasks import causal_lm, embedding, image_classification, text_classification  # noqa: F401  (registers)
from modelpress.tasks.base import TASKS, Task, get_task_class

if TYPE_CHECKING:  # pragma: no cover
    from modelpress.artifacts import Artifact

__all__ = ["TASKS", "Task", "get_task_class", "task_for"]


def task_for(artifact: Artifact) -> Task:
    """The task object (with tokenizer and settings) for an artifact."""
    return get_task_class(artifact.task).from_artifact(artifact)
