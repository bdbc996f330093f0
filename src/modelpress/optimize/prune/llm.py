"""One-shot pruning of a causal LM's linear layers with calibration data: SparseGPT and Wanda.

Both are implemented here from their papers, compactly: no well-kept library runs them on CPU
(the authors' repositories and llm-compressor assume CUDA and large models; torchao removed its
sparsity support), and each is a few dozen lines of linear algebra.

* **Wanda** (Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for Large
  Language Models"): the score of weight ``W[i, j]`` is ``|W[i, j]| * ||X_j||_2``, its magnitude
  times the norm of input feature ``j`` over the calibration tokens; each output row loses its
  lowest-scoring ``sparsity`` fraction (or, N:M, the lowest ``M - N`` of every ``M`` inputs;
  ``group: layer`` lets the whole layer compete instead). No weight is updated.
* **SparseGPT** (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot"): with ``H = X^T X`` of the layer's inputs (dampened by ``damp`` times its
  mean diagonal) and the upper Cholesky factor ``U`` of ``H^-1``, columns are visited left to
  right in blocks of ``block_size``; inside a block the mask takes the lowest ``w^2 / U_jj^2``
  (adaptive mask selection), and each pruned column's error ``(w - q) / U_jj`` is spread over
  the columns not yet visited (``W[:, j:] -= err * U[j, j:]``), the Optimal Brain Surgeon update
  that keeps the layer's output on the calibration data as close as possible.

Both run block by block (each decoder layer sees the outputs of the already pruned layers before
it, as in both papers): the inputs of the first decoder layer are captured once, each layer's
linear inputs are collected with hooks, the layer is pruned, and its pruned outputs feed the next.

Calibration is ``calibration.samples`` windows of ``calibration.seq_len`` tokens sampled from a
corpus (default ``tinyshakespeare-train``, never a test split), or, with ``seq_len: null``, the
padded line samples of :func:`modelpress.optimize.handlers.calibration_batches` (padding tokens
are left out of the statistics).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np

from modelpress.artifacts import Artifact
from modelpress.errors import OptimizationError
from modelpress.optimize.configs.base import Calibration
from modelpress.optimize.configs.prune import LLMCalibration, SparseGPT, Wanda
from modelpress.optimize.handlers import StepContext, calibration_batches, register_handler
from modelpress.optimize.prune.magnitude import (
    load_trainable,
    nm_mask,
    prunable_layers,
    smallest,
    smallest_per_row,
    sparsity_report,
    token_stream,
    write_pruned,
)
from modelpress.progress import ProgressFactory, no_progress

DEFAULT_CORPUS = "tinyshakespeare-train"
DAMP_RETRIES = 4  # a Hessian that is not positive definite gets 10x more damping, up to this many times


# -- the two algorithms on one weight ---------------------------------------------------------------
def wanda_mask(weight: Any, feature_sq_norms: Any, sparsity: float, nm: tuple[int, int] | None = None, group: str = "output") -> Any:
    """Wanda's mask (True = pruned) for ``weight`` [out, in] given ``sum_t x_tj^2`` per input ``j``."""
    scores = weight.detach().abs() * feature_sq_norms.sqrt().to(weight.dtype).reshape(1, -1)
    if nm is not None:
        return nm_mask(scores, *nm)
    if group == "layer":
        return smallest(scores, round(weight.numel() * sparsity))
    return smallest_per_row(scores, round(weight.shape[1] * sparsity))


def sparsegpt_prune_(
    weight: Any, hessian: Any, sparsity: float, nm: tuple[int, int] | None = None, *, block_size: int = 128, damp: float = 0.01
) -> Any:
    """Prune ``weight`` [out, in] in place with SparseGPT given ``H = X^T X`` [in, in]; returns the mask.

    Follows Algorithm 1 of the paper (and the authors' reference code): Cholesky of the inverse
    of the dampened Hessian, lazy block updates, adaptive mask selection per block. Inputs that
    never fire (zero diagonal) get a unit diagonal, so they are pruned by magnitude alone.
    """
    import torch

    W = weight.detach().to(torch.float64).clone()
    _rows, cols = W.shape
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    U = None
    scale = damp * float(torch.mean(torch.diag(H)))
    for _ in range(DAMP_RETRIES):
        try:
            Hd = H + scale * torch.eye(cols, dtype=H.dtype)
            U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
            break
        except RuntimeError:  # torch.linalg.LinAlgError: not positive definite
            scale *= 10.0
    if U is None:
        raise OptimizationError(
            "SparseGPT: the layer's input Hessian is not positive definite even after damping.",
            hint="Raise damp (e.g. 0.1) or calibrate on more tokens.",
        )
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        Err1 = torch.zeros_like(W1)
        M1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:  # adaptive mask selection: the block's lowest w^2 / U_jj^2
            M1 = smallest(W1**2 / d.reshape(1, -1) ** 2, round(W1.numel() * sparsity))
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:
                M1[:, j : j + nm[1]] = nm_mask(W1[:, j : j + nm[1]] ** 2 / d[j : j + nm[1]].reshape(1, -1) ** 2, *nm)
            w = W1[:, j]
            q = torch.where(M1[:, j], torch.zeros_like(w), w)
            err = (w - q) / d[j]
            W1[:, j:] -= err.reshape(-1, 1) * U1[j, j:].reshape(1, -1)
            W1[:, j] = q
            Err1[:, j] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        mask[:, i1:i2] = M1
    with torch.no_grad():
        weight.copy_(W.to(weight.dtype).masked_fill(mask, 0.0))
    return mask


def reconstruction_error(weight: Any, pruned: Any, hessian: Any) -> float:
    """``||(W - W') X||^2 / ||W X||^2`` on the calibration inputs, from ``H = X^T X``."""
    import torch

    H = hessian.to(torch.float64)
    dW = (weight - pruned).to(torch.float64)
    W = weight.to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", dW, H, dW) / torch.einsum("ij,jk,ik->", W, H, W).clamp_min(1e-30))


# -- calibration ---------------------------------------------------------------------------------


def calibration_token_batches(source: Artifact, calib: LLMCalibration, data_dir: Any) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """``calib.samples`` windows of ``calib.seq_len`` tokens from random places of the corpus."""
    from modelpress.datasets import TextCorpus, load_dataset
    from modelpress.tasks import task_for

    task = task_for(source)
    name = calib.dataset or DEFAULT_CORPUS
    if calib.seq_len is None:
        return calibration_batches(
            source, Calibration(dataset=name, samples=calib.samples, batch_size=calib.batch_size, seed=calib.seed), data_dir
        )
    ds = load_dataset(name, TextCorpus, data_dir_=data_dir)
    ids = token_stream(task, ds)
    seq = min(calib.seq_len, task.context)
    if len(ids) < seq + 1:
        raise OptimizationError(
            f"The calibration corpus '{ds.name}' has {len(ids)} tokens, fewer than one window of {seq}.",
            hint="Use a larger corpus, or a smaller calibration.seq_len.",
        )
    rng = np.random.default_rng(calib.seed)
    starts = np.sort(rng.integers(0, len(ids) - seq + 1, calib.samples))
    windows = np.stack([ids[s : s + seq] for s in starts])
    batches = [
        {"input_ids": windows[i : i + calib.batch_size], "attention_mask": np.ones_like(windows[i : i + calib.batch_size])}
        for i in range(0, len(windows), calib.batch_size)
    ]
    return batches, {"dataset": ds.name, "samples": len(windows), "seq_len": seq, "tokens": int(windows.size)}


# -- block by block ----------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook to end a forward pass once the first decoder layer's inputs are captured."""


def decoder_blocks(model: Any) -> tuple[str, Any]:
    """The longest ``nn.ModuleList`` whose every entry holds linear layers (the decoder layers)."""
    from torch import nn

    best: tuple[str, Any] | None = None
    for name, mod in model.named_modules():
        is_stack = (
            isinstance(mod, nn.ModuleList) and len(mod) and all(any(isinstance(s, nn.Linear) for s in child.modules()) for child in mod)
        )
        if is_stack and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise OptimizationError(
            f"{type(model).__name__} has no list of decoder layers with linear layers in them.",
            hint="SparseGPT and Wanda prune transformer decoders; use magnitude-prune for other models.",
        )
    return best


def _capture(model: Any, first: Any, batches: list[dict[str, np.ndarray]]) -> list[tuple[Any, tuple, dict]]:
    """(hidden states, other positional args, keyword args) of the first decoder layer, per batch."""
    import torch

    captured: list[tuple[Any, tuple, dict]] = []

    def hook(_mod: Any, args: tuple, kwargs: dict) -> None:
        if args:
            captured.append((args[0], args[1:], dict(kwargs)))
        else:
            kw = dict(kwargs)
            captured.append((kw.pop("hidden_states"), (), kw))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            with contextlib.suppress(_Stop):
                model(input_ids=torch.from_numpy(b["input_ids"]), attention_mask=torch.from_numpy(b["attention_mask"]), use_cache=False)
    finally:
        handle.remove()
    return captured


def _run_block(block: Any, hidden: Any, args: tuple, kwargs: dict) -> Any:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


def prune_causal_lm(
    model: Any, config: SparseGPT | Wanda, batches: list[dict[str, np.ndarray]], progress: ProgressFactory = no_progress
) -> dict[str, Any]:
    """Prune ``model``'s decoder linears in place with ``config``'s method; returns what was done."""
    import torch

    model.eval()
    _, blocks = decoder_blocks(model)
    chosen = prunable_layers(model, config, ["linear"])
    in_blocks: dict[int, dict[str, Any]] = {}
    for i, block in enumerate(blocks):
        in_blocks[i] = {name: mod for name, mod in chosen.items() if any(mod is m for m in block.modules())}
    outside = sorted(set(chosen) - {n for layer in in_blocks.values() for n in layer})
    sparsity, nm = config.target_sparsity, config.nm_pair
    errors: dict[str, float] = {}
    t0 = time.perf_counter()
    advance = progress(
        f"{config.technique_name}: pruning {len(blocks)} decoder layers to {sparsity:.0%}" + (f" ({config.nm})" if nm else ""), len(blocks)
    )
    with torch.no_grad():
        states = _capture(model, blocks[0], batches)
        token_masks = [torch.from_numpy(b["attention_mask"]).reshape(-1).bool() for b in batches]
        for i, block in enumerate(blocks):
            layers = in_blocks[i]
            stats = dict.fromkeys(layers)
            current = {"mask": None}

            def make_hook(name: str, stats: dict[str, Any] = stats, current: dict[str, Any] = current) -> Any:
                def hook(mod: Any, inputs: tuple) -> None:
                    x = inputs[0].reshape(-1, inputs[0].shape[-1])[current["mask"]].to(torch.float64)
                    s = (x.T @ x) if isinstance(config, SparseGPT) else (x * x).sum(0)
                    stats[name] = s if stats[name] is None else stats[name] + s

                return hook

            handles = [mod.register_forward_pre_hook(make_hook(name)) for name, mod in layers.items()]
            try:
                for (hidden, args, kwargs), tm in zip(states, token_masks, strict=True):
                    current["mask"] = tm
                    _run_block(block, hidden, args, kwargs)
            finally:
                for h in handles:
                    h.remove()
            for name, mod in layers.items():
                if stats[name] is None:
                    raise OptimizationError(
                        f"{config.technique_name}: layer {name} saw no calibration input.",
                        hint="Calibrate on more data, or exclude the layer.",
                    )
                if isinstance(config, SparseGPT):
                    before = mod.weight.detach().clone()
                    sparsegpt_prune_(mod.weight, stats[name], sparsity, nm, block_size=config.block_size, damp=config.damp)
                    errors[name] = round(reconstruction_error(before, mod.weight.detach(), stats[name]), 6)
                else:
                    mod.weight.masked_fill_(wanda_mask(mod.weight, stats[name], sparsity, nm, config.group), 0.0)
            states = [(_run_block(block, hidden, args, kwargs), args, kwargs) for hidden, args, kwargs in states]
            advance(1)
    report = {"method": config.technique_name, "target_sparsity": sparsity, "nm": config.nm, "seconds": round(time.perf_counter() - t0, 2)}
    report.update(sparsity_report({n: m for layer in in_blocks.values() for n, m in layer.items()}, model))
    if errors:
        report["relative_output_error"] = errors
    if outside:
        report["left_dense_outside_decoder_layers"] = outside
    return report


# -- the handlers -------------------------------------------------------------------------------------
def llm_prune(source: Artifact, config: SparseGPT | Wanda, ctx: StepContext, progress: ProgressFactory = no_progress) -> Artifact:
    import torch

    from modelpress.tasks import task_for

    if task_for(source).name != "causal-lm":
        raise OptimizationError(
            f"{config.technique_name} prunes the decoder layers of causal language models; '{source.name}' is a {source.task} model.",
            hint="Use technique: magnitude-prune (scope: layer or global, or nm: '2:4') for other models.",
        )
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    model, _ = load_trainable(source)
    batches, used = calibration_token_batches(source, config.calibration, ctx.data_dir)
    report = prune_causal_lm(model, config, batches, progress)
    report["calibration"] = used
    return write_pruned(source, config, ctx, model, report)


for _cls in (SparseGPT, Wanda):
    for _rt in SparseGPT.supported_runtimes:
        register_handler(_cls, _rt)(llm_prune)
