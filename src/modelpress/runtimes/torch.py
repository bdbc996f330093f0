"""PyTorch runner: eager by default, ``compile=True`` for ``torch.compile``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..artifacts import Artifact, Signature
from ..errors import TaskMismatchError, UnsupportedModelError
from .base import Runner, register_runtime


def load_torch_module(artifact: Artifact, *, attn_implementation: str | None = None) -> tuple[Any, Signature]:
    """The artifact as a torch module with the task's positional signature, in eval mode."""
    from transformers.utils import logging as hf_logging

    from ..tasks import task_for

    hf_logging.disable_progress_bar()
    task = task_for(artifact)
    if artifact.format == "torch":
        if artifact.module is None:
            raise UnsupportedModelError(f"Artifact '{artifact.name}' has format 'torch' but no module in memory.")
        module = artifact.module
        signature = artifact.manifest.signature or task.signature()
    elif artifact.format == "hf":
        if artifact.path is None:
            raise UnsupportedModelError(f"Artifact '{artifact.name}' has no folder to load from.")
        auto = task.auto_model_class()
        kwargs: dict[str, Any] = {}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if any(artifact.path.glob("*.safetensors")):
            kwargs["use_safetensors"] = True  # no pickled code
        try:
            hf_model, loading = auto.from_pretrained(str(artifact.path), output_loading_info=True, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise TaskMismatchError(
                f"'{artifact.path}' could not be loaded as a {task.name} model: {exc}",
                hint="Check --task (e.g. text-classification needs a *ForSequenceClassification model).",
            ) from exc
        missing = sorted(loading.get("missing_keys") or [])
        if missing:
            # transformers would fill these with random values: the model does not fit the task.
            raise TaskMismatchError(
                f"'{artifact.path}' could not be loaded as a {task.name} model: {len(missing)} weights are not in the "
                f"checkpoint and would be random ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}).",
                hint=f"Pass the task the model was trained for (its config says {getattr(hf_model.config, 'architectures', None)}), "
                "or fine-tune it for this task first.",
            )
        module = task.wrap_module(hf_model)
        signature = artifact.manifest.signature or task.signature(hf_model.config)
    else:
        raise UnsupportedModelError(
            f"The PyTorch runner cannot load a '{artifact.format}' artifact.",
            hint="Use --runtime onnxruntime for ONNX files and --runtime openvino for OpenVINO IR.",
        )
    module.eval()
    return module, signature


@register_runtime
class TorchRunner(Runner):
    """Options: ``compile`` (bool), ``attn_implementation`` ("sdpa", "eager")."""

    name = "torch"

    def _load(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        self.module, sig = load_torch_module(self.artifact, attn_implementation=self.options.get("attn_implementation"))
        self.signature = self.signature or sig
        self._call = torch.compile(self.module) if self.options.get("compile") else self.module

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(batch[n]) for n in self.signature.input_names]
        with torch.inference_mode():
            out = self._call(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {n: t.float().numpy() if t.is_floating_point() else t.numpy() for n, t in zip(self.signature.output_names, out, strict=True)}
