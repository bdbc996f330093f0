"""Preparing a model for quantization-aware training: the fake-quantized student (PT2E for static int8, torchao's
``QATConfig`` for weight-only) and the attention kernel it trains with. Used by :mod:`.qat`."""

from __future__ import annotations

import dataclasses
from typing import Any

from modelpress.errors import OptimizationError
from modelpress.optimize.configs import StaticInt8, WeightOnly


def _torch() -> Any:
    import torch

    return torch


# -- the fake-quantized student ---------------------------------------------------------------
def student_class() -> type:
    """The module the training loop trains: the prepared graph behind a ``train``/``eval`` that PT2E allows."""
    import torch

    class Student(torch.nn.Module):
        def __init__(self, graph: Any, exported: bool) -> None:
            super().__init__()
            self.graph = graph
            self.exported = exported

        def forward(self, *args: Any) -> Any:
            return self.graph(*args)

        def train(self, mode: bool = True) -> Any:
            # An exported graph refuses .train()/.eval(): PT2E swaps its dropout and batch-norm ops instead,
            # and the observers are frozen while the held-out set is scored.
            from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
            from torchao.quantization.pt2e.fake_quantize import disable_observer, enable_observer

            self.training = mode
            if self.exported:
                (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
                self.graph.apply(enable_observer if mode else disable_observer)
            else:
                self.graph.train(mode)
            return self

    return Student


def x86_config(*, qat: bool = True, per_channel: bool = True, weight_bits: int = 8) -> Any:
    """The X86 inductor quantizer's config (QAT or post-training), with per-tensor or narrower (4-bit) weight grids on request.

    8-bit per-channel is the quantizer's default (what static int8 on torch uses); the others
    describe harder settings for comparisons (the benchmark's W4A8 per tensor).
    """
    torch = _torch()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize
    from torchao.quantization.pt2e.observer import MinMaxObserver, MovingAverageMinMaxObserver

    base = xiq.get_default_x86_inductor_quantization_config(is_qat=qat)
    if per_channel and weight_bits == 8:
        return base
    qmax = 2 ** (weight_bits - 1) - 1
    weight = dataclasses.replace(base.weight, quant_min=-qmax - 1, quant_max=qmax)
    if not per_channel:
        ctr = (
            FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=2**-12)
            if qat
            else MinMaxObserver.with_args(eps=2**-12)
        )
        weight = dataclasses.replace(weight, qscheme=torch.per_tensor_symmetric, ch_axis=None, observer_or_fake_quant_ctr=ctr)
    return dataclasses.replace(base, weight=weight)


def dynamic_shapes(example: tuple[Any, ...]) -> tuple[dict[int, Any], ...]:
    """Batch dynamic for every input; the sequence too for token inputs (integer, 2-D+)."""
    from torch.export import Dim

    return tuple({0: Dim.AUTO, **({1: Dim.AUTO} if a.ndim >= 2 and not a.is_floating_point() else {})} for a in example)


def prepare_static(
    module: Any,
    example: tuple[Any, ...],
    *,
    per_channel: bool,
    weight_bits: int = 8,
    excluded: list[str] | None = None,
    matmuls: bool = False,
) -> Any:
    """PT2E QAT: export ``module`` (batch and token dimensions dynamic) and insert fake quantizers; ``matmuls``: on both
    inputs of every activation x activation ``matmul`` too (the X86 quantizer's default leaves them float)."""
    torch = _torch()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    try:
        graph = torch.export.export(module.eval(), example, dynamic_shapes=dynamic_shapes(example)).module()
    except Exception as exc:  # torch.export raises many types; all mean "cannot trace this model"
        raise OptimizationError(
            f"torch.export could not trace this model for QAT ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}).",
            hint="Use quantize: {technique: weight-only} (QAT in eager mode), or post-training static-int8.",
        ) from exc
    traced = set(graph.state_dict())
    graph.graph.eliminate_dead_code()  # an unused pooler leaves partitions the quantizer cannot annotate
    graph.recompile()
    config = x86_config(per_channel=per_channel, weight_bits=weight_bits)
    quantizer = xiq.X86InductorQuantizer().set_global(config)
    if matmuls:
        quantizer.set_function_type_qconfig(torch.matmul, config)
    for name in excluded or []:
        quantizer.set_module_name_qconfig(name, None)
    prepared = prepare_qat_pt2e(graph, quantizer)
    # weights the module's outputs never use (BertModel's pooler under a last-hidden-state module): dropped with the
    # dead code, not trained, kept as they are in the converted model
    prepared.unused_weights = sorted(traced - set(prepared.state_dict()))
    return prepared


def warm_up_observers(student: Any, batches: list[dict[str, Any]], names: list[str]) -> None:
    """Set the fake quantizers' ranges from a few batches (the model in eval mode, nothing trained), so the
    evaluation before the first step scores the quantized model, not uninitialised scales."""
    torch = _torch()
    from torchao.quantization.pt2e import move_exported_model_to_eval

    move_exported_model_to_eval(student.graph)
    with torch.no_grad():
        for batch in batches:
            student.graph(*[batch[n] for n in names if n in batch])


def weight_fake_quant_config(target: WeightOnly) -> Any:
    """torchao's ``IntxFakeQuantizeConfig`` simulating ``target``'s round-to-nearest weights."""
    torch = _torch()
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    dtype = torch.int4 if target.bits == 4 else torch.int8  # torch >= 2.6 has int4
    group = target.effective_group_size
    granularity: dict[str, Any] = {"granularity": "per_channel"} if group == -1 else {"group_size": group}
    return IntxFakeQuantizeConfig(dtype, is_symmetric=target.symmetric, **granularity)


def _linear_filter(excluded: set[str], group: int) -> Any:
    torch = _torch()

    def keep(mod: Any, fqn: str) -> bool:
        return isinstance(mod, torch.nn.Linear) and fqn not in excluded and (group == -1 or mod.in_features % group == 0)

    return keep


def prepare_weight_only(module: Any, target: WeightOnly, excluded: list[str]) -> Any:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(
        module,
        QATConfig(weight_config=weight_fake_quant_config(target), step="prepare"),
        filter_fn=_linear_filter(set(excluded), target.effective_group_size),
    )
    return module


def convert_weight_only(module: Any, target: WeightOnly) -> Any:
    """Swap the fake-quantized linears back to ``nn.Linear`` (the weight-only step quantizes them next)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    quantize_(
        module,
        QATConfig(step="convert"),
        filter_fn=lambda m, _: isinstance(m, FakeQuantizedLinear),
    )
    return module


def attention_kernel(target: Any) -> str | None:
    """``eager`` where the conversion quantizes attention's matmuls (ONNX Runtime's and OpenVINO's static int8
    quantize every MatMul, Q K^T and P V too): the X86 quantizer fake-quantizes eager attention's two
    ``matmul`` but not a fused ``scaled_dot_product_attention``, so with the default kernel QAT trained
    around the Linear layers only (docs/qat.md). Torch's static int8 keeps sdpa attention float: no change."""
    return "eager" if isinstance(target, StaticInt8) and target.runtime in ("onnxruntime", "openvino") else None
