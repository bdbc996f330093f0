"""Runners: one protocol, one module per backend."""

from . import onnxruntime, openvino, torch  # noqa: F401  (registers the runtimes)
from .base import RUNTIMES, Runner, create_runner, default_threads

__all__ = ["RUNTIMES", "Runner", "create_runner", "default_threads"]
