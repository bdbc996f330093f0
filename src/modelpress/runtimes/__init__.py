"""Runners: one protocol, one module per backend."""

from modelpress.runtimes import onnxruntime, openvino, torch  # noqa: F401  (registers the runtimes)
from modelpress.runtimes.base import RUNTIMES, Runner, create_runner, default_threads

__all__ = ["RUNTIMES", "Runner", "create_runner", "default_threads"]
