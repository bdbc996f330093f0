"""Unstructured and N:M magnitude pruning: configs, masks, a gradual schedule, and the handler.

Pruning here zeroes weights of ``nn.Linear`` and ``nn.Conv*`` layers; the shapes stay as they
are, so a pruned model is a dense model with zeros. It loads, exports and runs everywhere, and is
exactly as fast as the original on dense kernels: what it buys on this machine is measured by
:mod:`.sparse_store` (size stored sparse or compressed) and by the benchmark, never assumed.

* :class:`MagnitudePrune` (``technique: magnitude-prune``): remove the weights of smallest
  magnitude, per layer (``scope: layer``: each layer loses exactly ``sparsity`` of its weights)
  or over all layers at once (``scope: global``: one threshold, so layers end up with different
  sparsities); or an N:M pattern (``nm: "2:4"``: in every group of M consecutive input weights of
  an output, keep the N largest).
* :class:`GradualSchedule`: Zhu & Gupta's schedule (2017, "To prune, or not to prune"):
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0)) ** 3``, masks recomputed every
  ``frequency`` steps while fine-tuning. :class:`GradualPruner` applies it inside any training
  loop; a ``magnitude-prune`` step with a ``schedule`` runs a short bounded fine-tune with it.
* One-shot LLM pruning with calibration (SparseGPT, Wanda) is in :mod:`.llm_prune`; it shares
  the configs' base (:class:`PruneConfig`), the masks and the writer below.

The output layer (a language model's ``lm_head``, a classifier's head) stays dense unless
``keep_output_layer: false``; ``exclude`` keeps more layers dense (names or regular expressions).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import Artifact
from modelpress.errors import OptimizationError
from modelpress.optimize.configs.prune import PRUNE_RUNTIMES, FineTune, GradualSchedule, MagnitudePrune, PruneConfig, parse_nm  # noqa: F401
from modelpress.optimize.handlers import StepContext, copy_model_files, matches, register_handler, write_variant
from modelpress.progress import ProgressFactory, no_progress

WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


# -- text as one token stream (causal-lm fine-tuning here, SparseGPT/Wanda calibration in llm.py) --
CHUNK_CHARS = 8192  # a long text is tokenized in line-aligned pieces (one megabyte in one call is slow and warns)


def _chunks(text: str) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def token_stream(task: Any, corpus: Any) -> np.ndarray:
    """Every document of ``corpus`` tokenized (BOS first, as the task scores it), end to end."""
    bos = task.config.get("bos_token_id")
    parts = []
    for doc in corpus.documents:
        if not doc:
            continue
        if bos is not None:
            parts.append(np.asarray([bos], dtype=np.int64))
        for ids in task.tokenizer(_chunks(doc), add_special_tokens=False, verbose=False)["input_ids"]:
            parts.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# -- which layers ------------------------------------------------------------------------------
def _layer_classes(types: list[str]) -> tuple[type, ...]:
    from torch import nn

    out: list[type] = []
    if "linear" in types:
        out.append(nn.Linear)
    if "conv" in types:
        out += [nn.Conv1d, nn.Conv2d, nn.Conv3d]
    return tuple(out)


def output_layer(model: Any) -> Any | None:
    """The layer that makes the model's outputs (``lm_head``, a classifier), kept dense by default."""
    from torch import nn

    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is not None:
        return head
    if getattr(model, "config", None) is not None and not type(model).__name__.endswith(
        ("ForSequenceClassification", "ForImageClassification")
    ):
        return None  # a bare encoder: its last Linear is an ordinary layer
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def prunable_layers(model: Any, config: PruneConfig, layer_types: list[str] | None = None) -> dict[str, Any]:
    """``{module path: module}`` of the layers ``config`` prunes, in model order."""
    classes = _layer_classes(layer_types or getattr(config, "layer_types", ["linear", "conv"]))
    head = output_layer(model) if config.keep_output_layer else None
    found: dict[str, Any] = {}
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, classes) or mod is head or matches(name, config.exclude):
            continue
        if id(mod.weight) in seen:  # a weight shared by two layers is pruned once
            continue
        seen.add(id(mod.weight))
        found[name] = mod
    if not config.keep_output_layer:
        emb = getattr(model, "get_input_embeddings", lambda: None)()
        if emb is not None and any(mod.weight is emb.weight for mod in found.values()):
            raise OptimizationError(
                "The output layer shares its weights with the input embeddings, so pruning it would prune the embeddings too.",
                hint="Keep it dense (keep_output_layer: true, the default).",
            )
    if not found:
        raise OptimizationError(
            f"No layer to prune: the model has no {'/'.join(getattr(config, 'layer_types', ['linear']))} layers "
            f"left after exclude={config.exclude}.",
            hint="Check exclude (a regular expression matches anywhere in a module path), or layer_types.",
        )
    return found


# -- masks (True = pruned) -------------------------------------------------------------------
def smallest(scores: Any, k: int) -> Any:
    """A mask of the ``k`` smallest entries of ``scores`` (ties go to the earlier index)."""
    import torch

    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.argsort(scores.reshape(-1), stable=True)[:k]] = True
    return mask.reshape(scores.shape)


def smallest_per_row(scores: Any, k: int) -> Any:
    """A mask of the ``k`` smallest entries of each row of a 2-D ``scores``."""
    import torch

    mask = torch.zeros(scores.shape, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
    return mask


def nm_mask(scores: Any, n: int, m: int) -> Any:
    """Prune ``m - n`` of every ``m`` consecutive entries along the last axis of a 2-D ``scores``."""
    import torch

    rows, cols = scores.shape
    if cols % m:
        raise OptimizationError(
            f"An {n}:{m} pattern needs input widths that divide by {m}; a layer has {cols} inputs.",
            hint=f"Keep that layer dense with exclude, or use nm: '{n}:{m}' only on models whose widths divide by {m}.",
        )
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros(groups.shape, dtype=torch.bool)
    mask.scatter_(2, torch.argsort(groups, dim=2, stable=True)[:, :, : m - n], True)
    return mask.reshape(rows, cols)


def _matrix(weight: Any) -> Any:
    """A weight as [outputs, inputs] (a conv's kernel positions count as inputs)."""
    return weight.detach().reshape(weight.shape[0], -1)


def magnitude_masks(layers: dict[str, Any], sparsity: float, *, scope: str = "layer", nm: tuple[int, int] | None = None) -> dict[str, Any]:
    """Masks (True = pruned, shaped like each weight) removing the smallest ``|w|``."""
    import torch

    if nm is not None:
        return {name: nm_mask(_matrix(mod.weight).abs(), *nm).reshape(mod.weight.shape) for name, mod in layers.items()}
    if scope == "layer":
        return {name: smallest(mod.weight.detach().abs(), round(mod.weight.numel() * sparsity)) for name, mod in layers.items()}
    flat = torch.cat([mod.weight.detach().abs().reshape(-1) for mod in layers.values()])
    mask = smallest(flat, round(flat.numel() * sparsity))
    out, start = {}, 0
    for name, mod in layers.items():
        out[name] = mask[start : start + mod.weight.numel()].reshape(mod.weight.shape)
        start += mod.weight.numel()
    return out


def apply_masks(layers: dict[str, Any], masks: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for name, mod in layers.items():
            mod.weight.masked_fill_(masks[name], 0.0)


def sparsity_report(layers: dict[str, Any], model: Any | None = None) -> dict[str, Any]:
    """Zeros per pruned layer, over the pruned layers, and over every parameter of ``model``."""
    per_layer = {name: round(float((mod.weight == 0).float().mean()), 6) for name, mod in layers.items()}
    zeros = sum(int((mod.weight == 0).sum()) for mod in layers.values())
    total = sum(mod.weight.numel() for mod in layers.values())
    report: dict[str, Any] = {
        "sparsity": zeros / total,
        "pruned_layers": len(layers),
        "pruned_weights": total,
        "zero_weights": zeros,
        "layer_sparsity": per_layer,
    }
    if model is not None:
        params = {id(p): p for p in model.parameters()}.values()
        report["model_parameters"] = sum(p.numel() for p in params)
        report["model_sparsity"] = sum(int((p == 0).sum()) for p in params) / max(report["model_parameters"], 1)
    return report


class GradualPruner:
    """Prunes ``model`` gradually inside a training loop, following a :class:`GradualSchedule`.

    >>> pruner = GradualPruner(model, MagnitudePrune(sparsity=0.8), GradualSchedule(end_step=1000))  # doctest: +SKIP
    >>> for step in range(steps):                                                                   # doctest: +SKIP
    ...     pruner.update(step); loss.backward(); opt.step(); pruner.apply()

    ``update(step)`` recomputes the masks when the schedule says so (magnitude of the current
    weights; pruned weights are zero, so they stay pruned); ``apply()`` zeroes the masked
    weights again after each optimizer step.
    """

    def __init__(self, model: Any, config: MagnitudePrune, schedule: GradualSchedule | None = None) -> None:
        self.config = config
        self.schedule = schedule or config.schedule or GradualSchedule()
        self.layers = prunable_layers(model, config)
        self.masks: dict[str, Any] | None = None
        self.current = 0.0

    def update(self, step: int) -> float:
        if self.schedule.updates_at(step):
            self.current = self.schedule.sparsity_at(step, self.config.target_sparsity)
            self.masks = magnitude_masks(self.layers, self.current, scope=self.config.scope)
            self.apply()
        return self.current

    def apply(self) -> None:
        if self.masks is not None:
            apply_masks(self.layers, self.masks)

    def finish(self) -> None:
        """Prune to the final sparsity now (if the loop ended before ``end_step``)."""
        self.update(self.schedule.end_step)


# -- the model a handler prunes ----------------------------------------------------------------
def load_trainable(source: Artifact) -> tuple[Any, Any]:
    """(the model to prune and save, a positional module of the task's signature around it)."""
    from modelpress.runtimes.torch import MODULE_WEIGHTS
    from modelpress.tasks import task_for

    task = task_for(source)
    if source.format == "hf":
        from transformers.utils import logging as hf_logging

        from modelpress.runtimes.torch import hf_load_kwargs

        kwargs = hf_load_kwargs(source.path)  # safetensors only (pickles by explicit opt-in), no remote code

        hf_logging.disable_progress_bar()
        model = task.auto_model_class().from_pretrained(str(source.path), **kwargs)
        return model, task.wrap_module(model)
    if source.format == "torch" and source.module is not None:
        model = copy.deepcopy(source.module)
        weights = source.path / MODULE_WEIGHTS if source.path is not None else None
        if weights is not None and weights.is_file():
            from safetensors.torch import load_model

            load_model(model, str(weights))
        return model, model
    raise OptimizationError(
        f"Pruning works on PyTorch weights; '{source.name}' is a {source.format} artifact"
        + (" with no module in memory." if source.format == "torch" else "."),
        hint="Prune the original model (a Hugging Face folder or a torch module), then export or quantize the pruned one.",
    )


def write_pruned(source: Artifact, config: PruneConfig, ctx: StepContext, model: Any, metrics: dict[str, Any]) -> Artifact:
    """Write the pruned ``model`` as an artifact of the source's format, with its sizes stored sparse."""
    from modelpress.optimize.prune.sparse_store import size_report

    def fill(tmp: Path) -> dict[str, Any]:
        if source.format == "hf":
            model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            from safetensors.torch import save_model

            save_model(model, str(tmp / "model.safetensors"))
        if source.path is not None and source.path.is_dir():
            have = tuple(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            # Never hard-link a file this step rewrote (writing through a link would change the source).
            copy_model_files(source.path, tmp, skip=("modelpress.json", *WEIGHTS_FILES, *have))
        metrics["size"] = size_report(tmp)
        return {"metrics": metrics}

    art = write_variant(source, config, ctx, fmt=source.format, model_file=None, fill=fill)
    if source.format == "torch":
        art.module = source.module
    return art


# -- the handler -------------------------------------------------------------------------------
@register_handler(MagnitudePrune, "torch")
@register_handler(MagnitudePrune, "onnxruntime")
@register_handler(MagnitudePrune, "openvino")
def magnitude_prune(source: Artifact, config: MagnitudePrune, ctx: StepContext) -> Artifact:
    import torch

    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    model, wrapped = load_trainable(source)
    metrics: dict[str, Any] = {"method": "magnitude", "scope": config.scope, "nm": config.nm, "target_sparsity": config.target_sparsity}
    if config.schedule is not None:
        layers, metrics["fine_tune"] = gradual_fine_tune(source, model, wrapped, config, ctx)
    else:
        layers = prunable_layers(model, config)
        apply_masks(layers, magnitude_masks(layers, config.target_sparsity, scope=config.scope, nm=config.nm_pair))
    metrics.update(sparsity_report(layers, model))
    return write_pruned(source, config, ctx, model, metrics)


# -- gradual pruning while fine-tuning ------------------------------------------------------------
TRAIN_DEFAULTS = {"causal-lm": "tinyshakespeare-train", "text-classification": "sst2-train", "image-classification": "mnist-train5k"}


def _batches(source: Artifact, ft: FineTune, ctx: StepContext) -> Callable[[int], tuple[dict[str, np.ndarray], np.ndarray | None]]:
    """A function giving training batch ``i`` (inputs, labels; labels None for causal-lm)."""
    from modelpress.datasets import ImageDataset, LabeledTextDataset, TextCorpus, load_dataset
    from modelpress.tasks import task_for

    task = task_for(source)
    name = ft.dataset or TRAIN_DEFAULTS.get(task.name)
    if name is None:
        raise OptimizationError(
            f"Gradual pruning fine-tunes on labels or text; the {task.name} task has neither.",
            hint="Prune in one shot (drop schedule), or distill the pruned model.",
        )
    ds = load_dataset(name, task.dataset_kind, data_dir_=ctx.data_dir)
    rng = np.random.default_rng(ft.seed)
    if isinstance(ds, TextCorpus):
        ids = token_stream(task, ds)
        if len(ids) <= ft.seq_len + 1:
            raise OptimizationError(
                f"The corpus '{ds.name}' has {len(ids)} tokens, fewer than one window of {ft.seq_len}.",
                hint="Use a larger corpus or a smaller fine_tune.seq_len.",
            )

        def text_batch(_i: int) -> tuple[dict[str, np.ndarray], None]:
            starts = rng.integers(0, len(ids) - ft.seq_len, ft.batch_size)
            x = np.stack([ids[s : s + ft.seq_len] for s in starts])
            return {"input_ids": x, "attention_mask": np.ones_like(x)}, None

        return text_batch
    pool = ds.images if isinstance(ds, ImageDataset) else ds.texts if isinstance(ds, LabeledTextDataset) else None
    if pool is None:
        raise OptimizationError(f"Cannot fine-tune on a {type(ds).__name__}.")
    labels = np.asarray(ds.labels)

    def labeled_batch(_i: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        idx = rng.integers(0, len(labels), ft.batch_size)
        raw = pool[idx] if isinstance(pool, np.ndarray) else [pool[i] for i in idx]
        return task.preprocess(raw), labels[idx]

    return labeled_batch


def gradual_fine_tune(
    source: Artifact, model: Any, wrapped: Any, config: MagnitudePrune, ctx: StepContext, progress: ProgressFactory = no_progress
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fine-tune ``model`` for ``fine_tune.steps`` (or ``budget_s``) while the schedule prunes it."""
    import torch

    from modelpress.tasks import task_for

    ft = config.fine_tune or FineTune()
    task = task_for(source)
    names = task.signature().input_names
    batch_at = _batches(source, ft, ctx)
    pruner = GradualPruner(model, config)
    torch.manual_seed(ft.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ft.lr, weight_decay=0.0)
    wrapped.train()
    advance = progress(f"gradual pruning to {config.target_sparsity:.0%} while fine-tuning", ft.steps)
    t0, losses, step = time.perf_counter(), [], 0
    for step in range(ft.steps):
        if time.perf_counter() - t0 > ft.budget_s:
            break
        pruner.update(step)
        inputs, labels = batch_at(step)
        out = wrapped(*[torch.from_numpy(inputs[n]) for n in names if n in inputs])
        logits = out[0] if isinstance(out, tuple | list) else out
        if labels is None:  # next-token loss
            target = torch.from_numpy(inputs["input_ids"][:, 1:])
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1))
        else:
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pruner.apply()
        losses.append(float(loss.detach()))
        advance(1)
    pruner.finish()
    wrapped.eval()
    return pruner.layers, {
        "steps": len(losses),
        "seconds": round(time.perf_counter() - t0, 2),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }
