"""One small training loop, shared by recovery fine-tuning (after pruning) and distillation.

AdamW with a linear warm-up and linear decay of the learning rate, gradient clipping, an
evaluation on the task's metric every ``eval_every`` steps, early stopping after ``patience``
evaluations without improvement (the best weights are restored at the end), a step budget and
a wall-clock budget, checkpoints and resume, and a progress callback.

The data is a function of the step number (``loss_fn(model, step)`` builds its own batch for
that step), so a resumed run sees exactly the batches an uninterrupted one would: checkpoint
and resume give the same weights, bit for bit.

A checkpoint is a folder ``step-NNNNNN`` under ``checkpoint_dir`` with ``model.safetensors``
(the weights), ``optimizer.safetensors`` (AdamW's moments and the torch RNG state),
``best.safetensors`` (the best weights so far) and ``state.json`` (step, scheduler, best
metric, history, seconds spent). It is written to a temporary folder, fsynced and renamed, then
the ``latest`` file is replaced (``os.replace``) to point at it: a crash leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelpress._fs import atomic_folder, atomic_write_text
from modelpress.errors import ConfigError, OptimizationError
from modelpress.optimize.configs.training import TrainConfig  # re-exported: its home is configs
from modelpress.optimize.handlers import StepContext
from modelpress.progress import ProgressFactory, no_progress

LATEST = "latest"
STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass
class TrainingContext(StepContext):
    """A :class:`StepContext` (which now carries ``progress`` and ``train_threads`` itself); kept for callers that name it."""


def training_threads(ctx: StepContext) -> int:
    """Threads for a training run: the context's ``train_threads``, else the zoo's rule.

    On a machine whose load already reaches its core count, several torch threads spend most
    of their time spinning at OpenMP barriers, so a busy machine trains on one thread.
    ``ctx.threads`` is the runtime's setting for inference, not used here.
    """
    from modelpress.zoo import training_threads as auto

    return int(getattr(ctx, "train_threads", None) or auto(None))


@dataclass
class TrainResult:
    """What a training run did: steps, why it stopped, the best metric and where it was seen."""

    steps: int
    seconds: float
    stopped: str  # "max_steps", "time budget", "early stopping"
    best_metric: float | None = None
    best_step: int | None = None
    first_metric: float | None = None
    resumed_from: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- checkpoints ---------------------------------------------------------------------------
def _flatten_optimizer(opt: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """AdamW's state as (tensors for safetensors, JSON-ready rest)."""
    import torch

    sd = opt.state_dict()
    tensors: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().clone()
            else:
                plain[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("plain", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, model: Any, opt: Any, state: dict[str, Any], best: dict[str, Any] | None) -> Path:
    """Write a checkpoint atomically under ``folder`` and point ``latest`` at it; older ones are removed."""
    import torch
    from safetensors.torch import save_file, save_model

    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:06d}"
    target = folder / name
    with atomic_folder(target) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, meta = _flatten_optimizer(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps({**state, "optimizer": meta, "version": STATE_VERSION}, indent=1))
    atomic_write_text(folder / LATEST, name)
    for old in folder.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(folder: Path | None) -> Path | None:
    """The checkpoint ``latest`` points at, or None when there is none (or it is incomplete)."""
    if folder is None or not (folder / LATEST).is_file():
        return None
    target = folder / (folder / LATEST).read_text().strip()
    return target if (target / STATE_FILE).is_file() else None


def load_checkpoint(target: Path, model: Any, opt: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore weights, optimizer and RNG from ``target``; returns (state, best weights or None)."""
    import torch
    from safetensors.torch import load_file, load_model

    state = json.loads((target / STATE_FILE).read_text())
    if state.get("version") != STATE_VERSION:
        raise OptimizationError(
            f"The checkpoint {target} was written by another version of the training loop.", hint=f"Delete {target.parent} to start again."
        )
    load_model(model, str(target / "model.safetensors"))
    tensors = load_file(str(target / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    opt.load_state_dict(_unflatten_optimizer(tensors, state.pop("optimizer")))
    best = load_file(str(target / "best.safetensors")) if (target / "best.safetensors").is_file() else None
    return state, best


# -- the loop ---------------------------------------------------------------------------------
def _state_copy(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(
    model: Any,
    loss_fn: Callable[[Any, int], Any],
    config: TrainConfig,
    *,
    evaluate: Callable[[Any], float] | None = None,
    higher_is_better: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: ProgressFactory = no_progress,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    description: str = "training",
    parameters: list[Any] | None = None,
) -> TrainResult:
    """Train ``model`` in place: ``loss_fn(model, step)`` returns the loss of the batch for ``step``.

    ``evaluate(model)`` returns the task metric on held-out data (the model is in eval mode
    while it runs); with it, the best weights seen are restored at the end and training stops
    early when ``patience`` evaluations bring no improvement. ``checkpoint_dir``: checkpoints
    are written there, and with ``resume`` a run continues from the latest one found.
    ``progress(description, total)`` returns ``advance(n)``, called once per step.
    """
    import torch

    params = parameters if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise OptimizationError("The model has no trainable parameters.", hint="Unfreeze some layers (requires_grad=True) before training.")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and norms: no weight decay, as usual for AdamW
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    sign = 1.0 if higher_is_better else -1.0

    step, spent = 0, 0.0
    history: list[dict[str, float]] = []
    best_metric: float | None = None
    best_step: int | None = None
    first_metric: float | None = None
    bad_evals = 0
    best_weights: dict[str, Any] | None = None
    resumed_from = None
    found = latest_checkpoint(ckpt) if resume else None
    if found is not None:
        state, best_weights = load_checkpoint(found, model, opt)
        if state.get("config") != config.model_dump(mode="json"):
            raise ConfigError(
                f"The checkpoint in {ckpt} was made with other training settings.",
                hint=f"Use the same settings to resume, or delete {ckpt} (or pass resume=False) to start again.",
            )
        step, spent, history = state["step"], state["seconds"], state["history"]
        best_metric, best_step, first_metric, bad_evals = (
            state["best_metric"],
            state["best_step"],
            state["first_metric"],
            state["bad_evals"],
        )
        resumed_from = step
        if state.get("finished"):
            if best_weights is not None:
                model.load_state_dict(best_weights)
            return TrainResult(step, spent, state["stopped"], best_metric, best_step, first_metric, resumed_from, history)

    def run_eval(at: int) -> bool:
        """Evaluate, keep the best weights; True when patience has run out."""
        nonlocal best_metric, best_step, bad_evals, best_weights, first_metric
        model.eval()
        with torch.no_grad():
            metric = float(evaluate(model))  # type: ignore[misc]
        model.train()
        if not math.isfinite(metric):
            raise OptimizationError(f"The evaluation at step {at} gave {metric}.", hint="Lower the learning rate (lr) or check the data.")
        entry = {"step": float(at), "metric": metric}
        history.append(entry)
        if on_eval is not None:
            on_eval(entry)
        if first_metric is None:
            first_metric = metric
        if best_metric is None or sign * (metric - best_metric) > config.min_delta:
            best_metric, best_step, bad_evals = metric, at, 0
            best_weights = _state_copy(model)
            return False
        bad_evals += 1
        return config.patience is not None and bad_evals >= config.patience

    def checkpoint(finished: bool = False, stopped: str = "") -> None:
        if ckpt is None:
            return
        state = {
            "step": step,
            "seconds": spent,
            "history": history,
            "best_metric": best_metric,
            "best_step": best_step,
            "first_metric": first_metric,
            "bad_evals": bad_evals,
            "config": config.model_dump(mode="json"),
            "finished": finished,
            "stopped": stopped,
        }
        save_checkpoint(ckpt, model, opt, state, best_weights)

    model.train()
    if step == 0:
        torch.manual_seed(config.seed)
        if evaluate is not None and config.eval_at_start:
            run_eval(0)
    advance = progress(description, config.max_steps)
    advance(step)
    stopped = "max_steps"
    every_ckpt = config.checkpoint_every or config.eval_every
    t_start = time.perf_counter() - spent
    while step < config.max_steps:
        if config.max_seconds is not None and time.perf_counter() - t_start >= config.max_seconds:
            stopped = "time budget"
            break
        for g in opt.param_groups:
            g["lr"] = config.lr * config.lr_factor(step)
        loss = loss_fn(model, step)
        if not torch.isfinite(loss):
            raise OptimizationError(
                f"The training loss became {loss.item()} at step {step}.", hint="Lower the learning rate (lr), or raise warmup."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        step += 1
        advance(1)
        spent = time.perf_counter() - t_start
        if step % 50 == 0 or step == 1:
            history.append({"step": float(step), "loss": float(loss.detach())})
        give_up = False
        if evaluate is not None and config.eval_every is not None and step % config.eval_every == 0 and step < config.max_steps:
            give_up = run_eval(step)
        if every_ckpt is not None and step % every_ckpt == 0:
            checkpoint()
        if give_up:
            stopped = "early stopping"
            break
    if evaluate is not None and (not history or history[-1].get("step") != float(step) or "metric" not in history[-1]):
        run_eval(step)
    spent = time.perf_counter() - t_start
    checkpoint(finished=True, stopped=stopped)
    if best_weights is not None:
        model.load_state_dict(best_weights)
    model.eval()
    return TrainResult(step, spent, stopped, best_metric, best_step, first_metric, resumed_from, history)
