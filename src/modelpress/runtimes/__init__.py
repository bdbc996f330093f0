"""Runners: one protocol, one module per backend."""

from modelpress.runtimes import aoti, executorch, onnxruntime, openvino, openvino_decoder, torch, torchscript  # noqa: F401  (registers the runtimes)
from modelpress.runtimes.base import CONVERTERS, RUNTIMES, Runner, create_runner, default_threads, register_converter, runtime_of

__all__ = ["CONVERTERS", "RUNTIMES", "Runner", "create_runner", "default_threads", "register_converter", "runtime_of"]
