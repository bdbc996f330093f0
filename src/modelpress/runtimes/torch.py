"""PyTorch runner: eager by default; ``compile=True`` for ``torch.compile`` (with freezing).

Options (``create_runner(art, "torch", **options)``; a variant made by a torch technique stores
its own in ``task_config["runtime_options"]["torch"]``):

* ``compile`` (bool, default False): ``torch.compile`` the model (inductor);
* ``freezing`` (bool, default True when compiling): inductor freezing, which folds the weights
  into the graph as constants and pre-packs them for oneDNN (what makes bf16 and int8 fast on CPU);
* ``dynamic`` (bool, default True): mark the batch and sequence dimensions dynamic, so one
  compiled graph serves every length (a batch of 1 gets its own graph); False compiles one graph
  per input shape (up to torch's recompile limit, then eager);
* ``dtype`` ("fp32", "bf16", "fp16"): cast weights and activations;
* ``transform``: a transform spec or a list of them (:mod:`.torch_transforms`), applied when the
  model is loaded; ``calibration``: the ``.npz`` of calibration batches (in the artifact folder)
  that static int8 observes;
* ``attn_implementation`` ("sdpa", "eager"): the Hugging Face attention kernel;
* ``allow_pickle`` (bool, default False): read a Hugging Face folder that has only pickled
  weights (``pytorch_model.bin``). Refused by default: a pickle can run code when it is read.
  Allowed only with torch >= 2.6 (``torch.load(weights_only=True)`` is bypassable before it,
  CVE-2025-32434); ``MODELPRESS_ALLOW_PICKLE=1`` allows it for every loader (CLI included);
* ``tensor_parallel`` (int, default 1): split the model over that many worker processes
  (:mod:`.tensor_parallel`, ``docs/tensor-parallel.md``; eager only, with ``attn_implementation``
  and ``allow_pickle``); ``device`` ("cpu": gloo, default; "cuda": NCCL, one GPU per rank)
  says where the ranks run. ``close()`` ends the workers.

Compiling costs time on the first call (MiniLM: about 30-60 s on 2 cores, see docs/runtimes.md)
and again for each new shape class (batch of 1, or every shape with ``dynamic=False``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import Artifact, Signature
from modelpress.errors import ArtifactError, BackendUnavailableError, ConfigError, TaskMismatchError, UnsupportedModelError
from modelpress.runtimes.base import Runner, register_runtime
from modelpress.tasks import task_for

# The weights of a torch-module artifact stored as a folder (its code is never stored).
MODULE_WEIGHTS = "model.safetensors"
OPTIONS = (
    "compile", "freezing", "dynamic", "dtype", "transform", "calibration", "attn_implementation", "allow_pickle",
    "tensor_parallel", "device",
)  # fmt: skip
TENSOR_PARALLEL_OPTIONS = ("attn_implementation", "allow_pickle", "tensor_parallel", "device")  # what a split model takes
ALLOW_PICKLE_ENV = "MODELPRESS_ALLOW_PICKLE"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")  # weights torch.load would unpickle
SAFE_TORCH_LOAD = (2, 6)  # torch.load(weights_only=True) can run code before 2.6 (CVE-2025-32434)


def _torch_version() -> tuple[int, int]:
    import re

    import torch

    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def hf_load_kwargs(folder: str | os.PathLike, *, allow_pickle: bool | None = None) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that read a Hugging Face folder without running its code.

    ``trust_remote_code=False`` always; safetensors only when the folder has them. A folder whose
    only weights are pickled (``pytorch_model.bin``) is refused with an :class:`ArtifactError`
    unless ``allow_pickle`` (default: ``MODELPRESS_ALLOW_PICKLE=1`` in the environment), and
    then only on torch >= 2.6, whose ``weights_only=True`` loader (the one transformers uses)
    is not affected by CVE-2025-32434.
    """
    folder = Path(folder)
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        kwargs["use_safetensors"] = True
        return kwargs
    pickled = sorted({p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)})
    if not pickled:
        kwargs["use_safetensors"] = True  # no weights at all: transformers says which file it looked for
        return kwargs
    if allow_pickle is None:
        allow_pickle = os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")
    if not allow_pickle:
        raise ArtifactError(
            f"'{folder}' has only pickled weights ({', '.join(pickled[:3])}); modelpress reads safetensors only, "
            "because unpickling a file can run code hidden in it.",
            hint="Convert the weights once in a trusted environment: model = AutoModel.from_pretrained(DIR); "
            "model.save_pretrained(DIR, safe_serialization=True). Or, for a file you trust, allow it explicitly: "
            f"{ALLOW_PICKLE_ENV}=1 (or the torch runner option allow_pickle=True).",
        )
    if _torch_version() < SAFE_TORCH_LOAD:
        raise BackendUnavailableError(
            f"Reading the pickled weights of '{folder}' needs torch >= {SAFE_TORCH_LOAD[0]}.{SAFE_TORCH_LOAD[1]} "
            "(CVE-2025-32434: torch.load(weights_only=True) can run code in older versions).",
            hint="pip install -U 'torch>=2.6', or convert the weights to safetensors.",
        )
    kwargs["use_safetensors"] = False  # transformers reads them with torch.load(weights_only=True)
    return kwargs


def module_from_folder(artifact: Artifact) -> Any | None:
    """The module of a format-"torch" artifact folder, rebuilt from its architecture and weights.

    None when the manifest names no architecture (a module whose code only the user has: attach
    it with ``art.module = MyNet()``). No pickled code runs: the architecture is data and the
    weights are safetensors.
    """
    spec = artifact.manifest.task_config.get("architecture")
    if artifact.format != "torch" or artifact.path is None or spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("config", {}), dict):
        raise ArtifactError(
            f"The manifest of '{artifact.path}' has an invalid task_config.architecture: {spec!r}.",
            hint='It must look like {"name": "mnist-cnn", "config": {"conv_channels": [16, 32], "hidden": [128]}}.',
        )
    from modelpress.runtimes.architectures import build_module

    weights = artifact.path / MODULE_WEIGHTS
    if not weights.is_file():
        raise ArtifactError(
            f"'{artifact.path}' is a torch artifact without its weights file {MODULE_WEIGHTS}.", hint="Rebuild or re-export the artifact."
        )
    module = build_module(spec["name"], spec.get("config", {}))
    from safetensors.torch import load_model

    try:
        load_model(module, str(weights), strict=True)
    except RuntimeError as exc:  # missing or unexpected keys, or shapes that differ from the architecture
        raise ArtifactError(
            f"The weights in '{weights}' do not fit the architecture {spec['name']} {spec.get('config', {})}: "
            f"{str(exc).splitlines()[0][:300]}",
            hint="Save the architecture from the module itself (runtimes.architectures.describe_module) after changing its layers.",
        ) from exc
    return module.eval()


def load_torch_module(
    artifact: Artifact, *, attn_implementation: str | None = None, allow_pickle: bool | None = None
) -> tuple[Any, Signature]:
    """The artifact as a torch module with the task's positional signature, in eval mode."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    task = task_for(artifact)
    if artifact.format == "torch":
        if artifact.module is None:
            artifact.module = module_from_folder(artifact)  # a registered architecture, rebuilt from data
        if artifact.module is None:
            raise UnsupportedModelError(
                f"Artifact '{artifact.name}' has format 'torch' but no module in memory (a torch module's code is never "
                "stored, so a variant of one reopened from disk has only its weights and transform).",
                hint="Attach an instance of its class first: art = Artifact.open(path); art.module = MyNet() "
                "(the runner reads the weights from the folder's model.safetensors), or start from a Hugging Face folder.",
            )
        module = artifact.module
        signature = artifact.manifest.signature or task.signature()
    elif artifact.format == "hf":
        if artifact.path is None:
            raise UnsupportedModelError(f"Artifact '{artifact.name}' has no folder to load from.")
        auto = task.auto_model_class()
        kwargs: dict[str, Any] = hf_load_kwargs(artifact.path, allow_pickle=allow_pickle)  # no pickled or remote code
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
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


def _config_patch_is_per_thread() -> bool:
    """Whether ``torch._inductor.config.patch`` changes the flag for the calling thread only (a ContextVar per setting,
    as in torch 2.13); when it does not (older torch: one module-wide value), compiled calls must not overlap."""
    from contextvars import ContextVar

    import torch._inductor.config as inductor_config

    entry = getattr(inductor_config, "_config", {}).get("freezing")
    return isinstance(getattr(entry, "user_override", None), ContextVar)


class _Serial:
    """Compiled calls one at a time, where torch's config is one value for the whole process (see below)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._per_thread: bool | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if self._per_thread is None:
            self._per_thread = _config_patch_is_per_thread()
        if self._per_thread:
            yield
            return
        with self._lock:
            yield


_COMPILED_CALLS = _Serial()


@register_runtime
class TorchRunner(Runner):
    """Options: ``compile``, ``freezing``, ``dynamic``, ``dtype``, ``transform``, ``calibration``, ``attn_implementation``,
    ``allow_pickle``, ``tensor_parallel``, ``device``."""

    name = "torch"
    formats = ("hf", "torch")

    def __init__(self, artifact: Artifact, *, threads: int | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(
                f"Unknown option(s) for the torch runtime: {', '.join(unknown)}.",
                hint=f"Valid options: {', '.join(OPTIONS)}. Example: create_runner(art, 'torch', compile=True, dtype='bf16')",
            )
        super().__init__(artifact, threads=threads, **options)
        self.tensor_parallel = self._tensor_parallel()
        self._group: Any = None  # the tensor-parallel workers (runtimes.tensor_parallel.WorkerGroup)
        self.specs = self._specs()
        self.dynamic = bool(options.get("dynamic", True))
        self.freezing = bool(options.get("freezing", True))
        self.input_dtype: Any = None  # floating inputs are cast to the model's dtype (bf16, fp16)
        self._compiled = False

    @classmethod
    def on_module(cls, artifact: Artifact, module: Any, signature: Signature, *, threads: int | None = None) -> TorchRunner:
        """An eager runner, already loaded, on a module :func:`load_torch_module` returned (no second copy of the weights)."""
        runner = cls(artifact, threads=threads)
        runner.module, runner.signature, runner._call, runner._loaded = module, signature, module, True
        return runner

    def _tensor_parallel(self) -> int:
        from modelpress.runtimes.tensor_parallel import check_degree

        size = check_degree(self.options.get("tensor_parallel", 1))
        if size > 1:
            other = sorted(k for k, v in self.options.items() if k not in TENSOR_PARALLEL_OPTIONS and v not in (None, False))
            if other:
                raise ConfigError(
                    f"tensor_parallel runs the eager model; it does not take {', '.join(other)}.",
                    hint="Drop those options, e.g. create_runner(art, 'torch', tensor_parallel=2).",
                )
        elif self.options.get("device") not in (None, "cpu"):
            raise ConfigError(
                "device applies to the tensor-parallel ranks; the one-process torch runner runs on the CPU.",
                hint="Example: create_runner(art, 'torch', tensor_parallel=2, device='cuda')",
            )
        return size

    def _specs(self) -> list[dict[str, Any]]:
        from modelpress.runtimes.torch_transforms import normalize_transforms

        specs = list(normalize_transforms(self.options.get("transform")))
        dtype = self.options.get("dtype")
        if dtype is not None:
            cast = next((s for s in specs if s["kind"] == "cast"), None)
            if cast is None:
                specs.insert(0, {"kind": "cast", "dtype": dtype})
            elif cast["dtype"] != dtype:
                raise ConfigError(
                    f"dtype='{dtype}' contradicts the variant's own cast to {cast['dtype']}.",
                    hint="Drop the dtype option, or start from the float model to cast it to another dtype.",
                )
        return normalize_transforms(specs)

    def _load(self) -> None:
        import torch

        from modelpress.runtimes.torch_transforms import DTYPES, apply_transforms, copy_module, load_batches

        if self.tensor_parallel > 1:
            keep = ("attn_implementation", "allow_pickle")
            options = {k: v for k, v in self.options.items() if k in keep and v is not None}
            self._group = _start_tensor_parallel(
                self.loadable(), self.tensor_parallel, threads=self.threads, device=self.options.get("device") or "cpu", options=options
            )
            self.signature = self.signature or self._group.info
            return
        torch.set_num_threads(self.threads)
        module, sig = load_torch_module(
            self.artifact, attn_implementation=self.options.get("attn_implementation"), allow_pickle=self.options.get("allow_pickle")
        )
        self.signature = self.signature or sig
        weights = self.artifact.path / MODULE_WEIGHTS if self.artifact.format == "torch" and self.artifact.path else None
        if self.artifact.format == "torch" and (self.specs or (weights is not None and weights.is_file())):
            module = copy_module(module)  # the caller's module stays as it is
            if weights is not None and weights.is_file():
                from safetensors.torch import load_model

                try:
                    load_model(module, str(weights))
                except RuntimeError as exc:  # missing or unexpected keys, wrong shapes
                    raise UnsupportedModelError(
                        f"The module attached to '{self.artifact.name}' does not fit the weights in {weights}: {str(exc)[:300]}",
                        hint="Attach an instance of the class the variant was made from (same layers, same shapes).",
                    ) from exc
        if self.specs:
            calibration = None
            if any(s["kind"] == "static-int8" for s in self.specs):
                calibration = load_batches(self._calibration_file())
            module = apply_transforms(module, self.specs, input_names=self.signature.input_names, calibration=calibration)
            cast = next((s for s in self.specs if s["kind"] == "cast"), None)
            if cast is not None:
                self.input_dtype = DTYPES[cast["dtype"]]
        self.module = module
        if self.options.get("compile"):
            self._call = torch.compile(module, dynamic=None if self.dynamic else False)
            self._compiled = True
        else:
            self._call = module

    def _calibration_file(self):
        from pathlib import Path

        name = self.options.get("calibration")
        if not name:
            raise ConfigError(
                "This torch variant is statically quantized but names no calibration file.",
                hint="Pass calibration='calibration.npz' (the file the static-int8 step stored), or rebuild the variant.",
            )
        path = Path(name)
        if not path.is_absolute():
            if self.artifact.path is None:
                raise ConfigError(
                    f"The calibration file '{name}' is relative, and this artifact has no folder.", hint="Pass an absolute path."
                )
            path = self.artifact.path / path
        return path

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        sig = self.signature
        if sig is None:  # _load always sets it
            raise UnsupportedModelError(f"The torch runner of '{self.artifact.name}' has no signature.", hint="Call runner.load() first.")
        if self._group is not None:
            return dict(zip(sig.output_names, self._group.call("run", batch), strict=True))
        args = []
        for n in sig.input_names:
            t = torch.from_numpy(batch[n])
            if self.input_dtype is not None and t.is_floating_point() and t.dtype != self.input_dtype:
                t = t.to(self.input_dtype)
            if self._compiled and self.dynamic:
                torch._dynamo.maybe_mark_dynamic(t, 0)
                if t.ndim >= 2 and not t.is_floating_point():
                    torch._dynamo.maybe_mark_dynamic(t, 1)  # token inputs: the sequence too
            args.append(t)
        with torch.inference_mode():
            if self._compiled:
                # Dynamo reads inductor's freezing flag while it traces (on the first call, and on a
                # recompile) to decide whether weights become constants, so the flag must be set
                # around the call; torch.compile(options={"freezing": True}) alone does not freeze,
                # and PT2E's int8 weights then fail to compile (onednn.qlinear_prepack on fake tensors).
                # The server calls a runner from several worker threads at once: torch 2.13 keeps a patch to the
                # thread that made it; where torch keeps one value for the process, the first call to leave would
                # restore the flag while another thread traces, so there compiled calls run one at a time.
                with _COMPILED_CALLS.held(), torch._inductor.config.patch(freezing=self.freezing):
                    out = self._call(*args)
            else:
                out = self._call(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {n: t.float().numpy() if t.is_floating_point() else t.numpy() for n, t in zip(sig.output_names, out, strict=True)}

    def close(self) -> None:
        if self._group is not None:
            self._group.close()  # joins the workers, and kills those that do not exit
            self._group = None
        super().close()


# --- tensor parallelism (runtimes.tensor_parallel runs the workers; the runner's program is here, beside the loader)
def _tensor_parallel_program(spec: Any, rank: Any) -> tuple[Any, Signature]:
    """In each worker: load the artifact's module (the task's wrapper of a transformers model), keep this rank's
    shard, run batches (rank 0's outputs go back to the runner)."""
    import torch

    from modelpress.runtimes.tensor_parallel import shard_model

    artifact, options = spec
    module, signature = load_torch_module(artifact, **options)
    shard_model(module, rank)
    module.to(rank.device)
    names = signature.input_names

    def handle(method: str, batch: dict[str, np.ndarray]) -> list[np.ndarray] | None:
        if method != "run":
            raise UnsupportedModelError(f"tensor-parallel runner: unknown call '{method}'.")
        out = module(*(torch.from_numpy(batch[n]).to(rank.device) for n in names))
        if rank.rank != 0:
            return None
        out = (out,) if isinstance(out, torch.Tensor) else out
        return [t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy() for t in out]

    return handle, signature


def _start_tensor_parallel(artifact: Artifact, size: int, *, threads: int, device: str, options: dict[str, Any]) -> Any:
    """The workers of a tensor-parallel runner on a Hugging Face folder artifact (checked before any process starts)."""
    from transformers import AutoConfig

    from modelpress.runtimes.tensor_parallel import WorkerGroup, check_degree, check_device

    if artifact.format != "hf" or artifact.path is None:
        raise UnsupportedModelError(
            f"tensor_parallel splits a Hugging Face model folder; '{artifact.name}' is a '{artifact.format}' artifact.",
            hint="Load the model from its folder (modelpress.load('path/to/model')), or run it in one process.",
        )
    config = AutoConfig.from_pretrained(str(artifact.path), trust_remote_code=False)
    check_degree(size, config)
    check_device(device, size)
    return WorkerGroup(size, _tensor_parallel_program, (artifact, options), threads=threads, device=device, name=artifact.name)
