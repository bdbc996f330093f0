"""What the runners of PyTorch's own file formats share (AOTInductor ``.pt2``, TorchScript ``.pt``).

The file is made by ``modelpress.export`` from a Hugging Face folder or a torch module (the
runner asks for it through the converter of its format, like ONNX Runtime asks for ONNX), and
called with one tensor per signature input. Its export records the range of each dynamic axis
it was exported for (``manifest.step["dynamic_axes"]``, e.g. ``{"sequence": [1, 512]}``); a batch
outside the range, or one whose fixed axes differ from the signature, is refused with an
:class:`InvalidInputError` before the compiled code sees it: compiled kernels do not check the
shapes they are given (an AOTInductor MiniLM indexes its 512 position embeddings with a 600th
position and returns whatever the memory holds).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np

from modelpress.artifacts import Signature
from modelpress.errors import InvalidInputError, UnsupportedModelError
from modelpress.runtimes.base import Runner


def axis_ranges(artifact: Any) -> dict[str, tuple[int, int | None]]:
    """The ``[min, max]`` of each named dynamic axis the export recorded (max None: unbounded)."""
    raw = (artifact.manifest.step or {}).get("dynamic_axes") or {}
    out: dict[str, tuple[int, int | None]] = {}
    if isinstance(raw, dict):
        for name, pair in raw.items():
            if isinstance(pair, list | tuple) and len(pair) == 2:
                lo, hi = pair
                out[str(name)] = (int(lo) if lo is not None else 1, int(hi) if hi is not None else None)
    return out


class TorchProgramRunner(Runner):
    """A runner that calls a loaded PyTorch program with one tensor per input (no options)."""

    splits_batch: ClassVar[bool] = False  # True: _call cuts a batch past the exported maximum into pieces

    def _load(self) -> None:
        import torch

        art = self.loaded_artifact = self.loadable()
        if art.model_file is None or not art.model_file.is_file():
            raise UnsupportedModelError(
                f"The {self.name} artifact '{art.name}' has no model file ({art.manifest.model_file}).",
                hint=f"Export it again: modelpress export MODEL --format {self.target_format} -o DIR",
            )
        torch.set_num_threads(self.threads)
        self.signature = self.signature or art.manifest.signature
        if self.signature is None:
            raise UnsupportedModelError(
                f"The {self.name} artifact '{art.name}' records no signature.",
                hint=f"Export it with modelpress: modelpress export MODEL --format {self.target_format} -o DIR",
            )
        self._ranges = axis_ranges(art)
        self.program = self._open(art)

    @abstractmethod
    def _open(self, artifact: Any) -> Any:
        """The callable program in ``artifact.model_file``."""

    def _call(self, args: list[Any]) -> Any:
        """The program's outputs for one tensor per input."""
        return self.program(*args)

    def _check_shapes(self, sig: Signature, batch: dict[str, np.ndarray]) -> None:
        for spec in sig.inputs:
            shape = batch[spec.name].shape
            for i, dim in enumerate(spec.shape):
                size = shape[i]
                if isinstance(dim, int):
                    if size != dim:
                        raise InvalidInputError(
                            f"Input '{spec.name}' has size {size} on axis {i}; this {self.name} model takes {dim} there {spec.shape}.",
                            hint="Reshape the input to the model's signature (see `modelpress info MODEL`).",
                        )
                    continue
                lo, hi = self._ranges.get(dim, (1, None))
                if dim == "batch" and self.splits_batch:
                    hi = None
                if size < lo or (hi is not None and size > hi):
                    raise InvalidInputError(
                        f"Input '{spec.name}' has {dim} {size}; this {self.name} model was exported for {dim} "
                        f"{lo}..{hi if hi is not None else 'any'}.",
                        hint=f"Cut the input to at most {hi} (the tokenizer's max_length does it for text)."
                        if hi is not None
                        else f"Send at least {lo}.",
                    )

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        sig = self.signature
        if sig is None:  # _load always sets it
            raise UnsupportedModelError(
                f"The {self.name} runner of '{self.artifact.name}' has no signature.", hint="Call runner.load() first."
            )
        self._check_shapes(sig, batch)
        args = [torch.from_numpy(batch[n]) for n in sig.input_names]
        with torch.inference_mode():
            out = self._call(args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        elif isinstance(out, dict):  # an exported dict output, in the signature's order
            out = tuple(out[n] for n in sig.output_names)
        return {n: t.float().numpy() if t.is_floating_point() else t.numpy() for n, t in zip(sig.output_names, out, strict=True)}

    def close(self) -> None:
        self.program = None  # the program (and its weights) goes with its last reference
        super().close()
