"""Numerical parity of an exported model with its source.

Tolerance (fp32 exports): the largest absolute difference over every output must be at most
``PARITY_RTOL * max(1, max|reference|)``. Exporters and runtimes fuse and reorder fp32 sums,
which moves outputs by about 1e-6 relative; a broken operator, a wrong mask or a lost axis moves
them by 1e-2 or more. 1e-3 sits well between the two.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from modelpress.errors import ParityError

PARITY_RTOL = 1e-3


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], rtol: float = PARITY_RTOL) -> dict[str, float]:
    """max-abs-diff and allowed tolerance per output; raises :class:`ParityError` past it."""
    report: dict[str, float] = {}
    worst = (0.0, 0.0, "")
    for name, ref in reference.items():
        if name not in candidate:
            raise ParityError(f"The exported model has no output '{name}'.", max_abs_diff=float("inf"), tolerance=0.0)
        got = np.asarray(candidate[name], dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if got.shape != ref.shape:
            raise ParityError(
                f"Output '{name}' has shape {list(got.shape)} in the export but {list(ref.shape)} in the source.",
                max_abs_diff=float("inf"),
                tolerance=0.0,
                hint="A dynamic axis was probably fixed during export; export with dynamic batch and sequence axes.",
            )
        diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
        tol = rtol * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
        report[name] = diff
        report[f"{name}_tolerance"] = tol
        if diff / tol > (worst[0] / worst[1] if worst[1] else 0):
            worst = (diff, tol, name)
    if worst[1] and worst[0] > worst[1]:
        raise ParityError(
            f"The export differs from its source: output '{worst[2]}' max-abs-diff {worst[0]:.3g} > tolerance {worst[1]:.3g}.",
            max_abs_diff=worst[0],
            tolerance=worst[1],
            hint="Try the other exporter (dynamo=False), a newer opset, or report the model; nothing was written.",
        )
    return report


def check_parity(
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    candidate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    batches: list[dict[str, np.ndarray]],
    rtol: float = PARITY_RTOL,
) -> dict[str, float]:
    """Run both on every batch; the worst max-abs-diff per output (raises past the tolerance)."""
    worst: dict[str, float] = {}
    for batch in batches:
        rep = compare_outputs(reference(batch), candidate(batch), rtol)
        for k, v in rep.items():
            worst[k] = max(worst.get(k, 0.0), v)
    return worst


def parity_batches(task, data_dir=None) -> list[dict[str, np.ndarray]]:
    """Two batches of different shapes, so a fixed axis in the export shows up."""
    if task.uses_tokenizer():
        return [task.sample_inputs(2, seq_len=16, data_dir=data_dir), task.sample_inputs(3, data_dir=data_dir)]
    return [task.sample_inputs(2, data_dir=data_dir), task.sample_inputs(5, data_dir=data_dir)]
