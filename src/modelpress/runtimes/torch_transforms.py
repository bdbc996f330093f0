"""Torch-level model transforms: casts and torchao quantization, applied when a model is loaded.

A torch variant made by an optimization step is stored as its source's files plus a list of
transform specs in ``task_config["runtime_options"]["torch"]["transform"]``; the PyTorch runner
applies them to the float model it loads. Nothing pickled is ever read: torchao quantization is
deterministic from the float weights, and static int8 re-calibrates on the calibration batches
stored in the artifact as an ``.npz`` (numbers only, read with ``allow_pickle=False``).

A spec is a small JSON dict; ``kind`` says which transform, ``exclude`` lists layers to keep in
float (each a module path such as ``model.encoder.layer.0.output.dense``, or a regular expression
searched in it: the same names the ONNX Runtime techniques match):

* ``{"kind": "cast", "dtype": "bf16"}``: weights and activations in bf16 / fp16 (excluded modules
  run in fp32, their inputs cast up and their outputs cast back);
* ``{"kind": "dynamic-int8", "reduce_range": false}``: torchao
  ``Int8DynamicActivationInt8WeightConfig`` on every ``nn.Linear`` (int8 weights per output
  channel, activations per token);
* ``{"kind": "weight-only", "bits": 8, "group_size": -1, "symmetric": true}``: torchao
  ``Int8WeightOnlyConfig`` (8 bits, symmetric, per channel or per group), ``IntxWeightOnlyConfig``
  (8 bits asymmetric; 4 bits symmetric, stored unpacked in int8), or
  ``PrototypeInt4WeightOnlyConfig`` (4 bits asymmetric, group 32-256: the packed CPU kernel);
* ``{"kind": "static-int8", "reduce_range": false}``: PT2E with ``X86InductorQuantizer``
  (``torchao.quantization.pt2e``): the model is exported with ``torch.export`` (batch and
  sequence dynamic), observed on the calibration batches, and converted to q/dq form, which
  ``torch.compile`` lowers to oneDNN int8 kernels.

A cast is applied before quantization (torchao's packed int4 weights cannot be cast afterwards);
at most one quantization spec, and static int8 runs in fp32 (no cast with it).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.errors import ConfigError, OptimizationError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Spec keys per kind (besides ``kind`` and ``exclude``), with their defaults.
KINDS: dict[str, dict[str, Any]] = {
    "cast": {"dtype": "bf16"},
    "dynamic-int8": {"reduce_range": False},
    "weight-only": {"bits": 8, "group_size": -1, "symmetric": True},
    "static-int8": {"reduce_range": False},
}
QUANT_KINDS = ("dynamic-int8", "weight-only", "static-int8")
# Group sizes torchao's packed CPU int4 kernel (tinygemm layout) takes.
INT4_PACKED_GROUPS = (32, 64, 128, 256)
PACKED_INT4_OUT_MULTIPLE = 16  # _convert_weight_to_int4pack_cpu: "expect N to be dividable by 16"
EXAMPLE = '{"kind": "dynamic-int8", "exclude": ["model.encoder.layer.0.output.dense"]}'


# -- specs ------------------------------------------------------------------------------------
def normalize_transforms(value: Any) -> list[dict[str, Any]]:
    """A spec dict, a list of them, or None, checked and in the order they are applied."""
    if value is None:
        return []
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"transform must be a dict or a list of dicts, got {type(value).__name__}.", hint=f"Example: {EXAMPLE}")
    specs = [_check_spec(item, i) for i, item in enumerate(items)]
    casts = [s for s in specs if s["kind"] == "cast"]
    quants = [s for s in specs if s["kind"] in QUANT_KINDS]
    if len(casts) > 1 or len(quants) > 1:
        raise ConfigError(
            f"A torch model takes at most one cast and one quantization transform; got {[s['kind'] for s in specs]}.",
            hint="Keep one precision step and one quantization step in the recipe for runtime torch.",
        )
    if casts and quants and quants[0]["kind"] == "static-int8" and casts[0]["dtype"] != "fp32":
        raise ConfigError(
            "static-int8 on torch runs its float parts in fp32 and cannot be combined with a bf16/fp16 cast.",
            hint="Drop the precision step, or use dynamic-int8 / weight-only with bf16.",
        )
    return casts + quants


def _check_spec(item: Any, index: int) -> dict[str, Any]:
    if not isinstance(item, dict) or item.get("kind") not in KINDS:
        kind = item.get("kind") if isinstance(item, dict) else item
        raise ConfigError(f"transform {index + 1}: unknown kind {kind!r}.", hint=f"Known kinds: {', '.join(KINDS)}. Example: {EXAMPLE}")
    kind = item["kind"]
    allowed = {"kind", "exclude", *KINDS[kind]}
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise ConfigError(f"transform {index + 1} ({kind}): unknown keys {unknown}.", hint=f"Valid keys: {', '.join(sorted(allowed))}.")
    spec = {"kind": kind, **KINDS[kind], **{k: v for k, v in item.items() if k != "kind"}}
    exclude = spec.setdefault("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise ConfigError(
            f"transform {index + 1}: exclude must be a list of layer names or regular expressions.", hint=f"Example: {EXAMPLE}"
        )
    for pattern in exclude:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(
                f"transform {index + 1}: '{pattern}' is not a valid regular expression ({exc}).", hint=f"Example: {EXAMPLE}"
            ) from None
    if kind == "cast" and spec["dtype"] not in DTYPES:
        raise ConfigError(f"Unknown dtype {spec['dtype']!r} for a cast.", hint=f"Use one of {', '.join(DTYPES)}, e.g. dtype='bf16'.")
    if kind == "weight-only":
        bits, group = spec["bits"], spec["group_size"]
        if bits not in (4, 8):
            raise ConfigError(f"weight-only bits must be 4 or 8, got {bits!r}.", hint="Example: bits=8")
        if not isinstance(group, int) or (group != -1 and (group < 16 or group & (group - 1))):
            raise ConfigError(
                f"group_size must be -1 (per channel) or a power of two >= 16, got {group!r}.", hint="Example: group_size=128"
            )
        if bits == 4 and not spec["symmetric"] and group not in INT4_PACKED_GROUPS:
            raise ConfigError(
                f"Asymmetric 4-bit weights on torch use torchao's packed CPU kernel, which takes group sizes {INT4_PACKED_GROUPS}; "
                f"got {group}.",
                hint="Use group_size 32, 64, 128 or 256, or symmetric: true (per channel allowed).",
            )
    return spec


# -- layers -----------------------------------------------------------------------------------
def matches(name: str, patterns: Sequence[str]) -> bool:
    """A layer matches an exclusion entry equal to its name or a regular expression found in it."""
    return any(p == name or re.search(p, name) for p in patterns)


def quantizable_layers(module: nn.Module, kind: str = "dynamic-int8") -> list[str]:
    """Module paths of the layers a quantization kind changes (exclusion entries match these)."""
    types: tuple[type, ...] = (nn.Linear, nn.Conv2d) if kind == "static-int8" else (nn.Linear,)
    return [name for name, m in module.named_modules() if isinstance(m, types)]


def _check_exclude(module: nn.Module, spec: dict[str, Any]) -> list[str]:
    """The layers ``spec['exclude']`` keeps in float; an entry that matches nothing is an error."""
    if spec["kind"] == "cast":
        names = [n for n, _ in module.named_modules() if n]
    else:
        names = quantizable_layers(module, spec["kind"])
    excluded = [n for n in names if matches(n, spec["exclude"])]
    for pattern in spec["exclude"]:
        if not any(matches(n, [pattern]) for n in names):
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise ConfigError(
                f"exclude entry '{pattern}' matches no layer of this model that {spec['kind']} changes.",
                hint=f"Layers are torch module paths, e.g. {shown or '(none)'}; an entry is an exact path or a regular expression.",
            )
    return excluded


# -- applying ---------------------------------------------------------------------------------
def apply_transforms(
    module: nn.Module,
    specs: Any,
    *,
    input_names: Sequence[str],
    calibration: list[dict[str, np.ndarray]] | None = None,
) -> nn.Module:
    """``module`` with ``specs`` applied (in place where torchao works in place: pass a copy).

    ``calibration``: input batches for static int8, in the model's signature names.
    """
    out = module
    for spec in normalize_transforms(specs):
        excluded = _check_exclude(out, spec)
        if spec["kind"] == "cast":
            out = cast(out, spec["dtype"], excluded)
        elif spec["kind"] == "static-int8":
            if not calibration:
                raise ConfigError(
                    "static-int8 needs calibration batches and none were given.",
                    hint="A static-int8 artifact stores them in calibration.npz; pass calibration='calibration.npz' to the runner.",
                )
            out = static_int8(out, calibration, input_names, excluded, reduce_range=bool(spec["reduce_range"]))
        else:
            _torchao_quantize(out, spec, excluded)
    return out


def cast(module: nn.Module, dtype: str, excluded: Sequence[str] = ()) -> nn.Module:
    """Cast to ``dtype``; ``excluded`` modules (and what they hold) stay fp32 behind casting hooks."""
    target = DTYPES[dtype]
    module.to(target)
    if target == torch.float32:
        return module
    tops = [n for n in excluded if not any(n.startswith(o + ".") for o in excluded if o != n)]
    for name in tops:
        sub = module.get_submodule(name)
        sub.float()
        sub.register_forward_pre_hook(_cast_hook(torch.float32), with_kwargs=True)
        sub.register_forward_hook(_cast_output_hook(target))
    return module


def _cast_tree(obj: Any, dtype: torch.dtype) -> Any:
    from torch.utils._pytree import tree_map_only

    return tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, obj)


def _cast_hook(dtype: torch.dtype) -> Callable[..., Any]:
    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple:
        return _cast_tree(args, dtype), _cast_tree(kwargs, dtype)

    return hook


def _cast_output_hook(dtype: torch.dtype) -> Callable[..., Any]:
    def hook(_mod: nn.Module, _args: tuple, output: Any) -> Any:
        return _cast_tree(output, dtype)

    return hook


def torchao_config(spec: dict[str, Any]) -> Any:
    """The torchao config object for a dynamic-int8 or weight-only spec."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
        PerRow,
    )
    from torchao.quantization.quant_primitives import MappingType

    if spec["kind"] == "dynamic-int8":
        return Int8DynamicActivationInt8WeightConfig(granularity=PerRow(), reduce_range=bool(spec["reduce_range"]))
    bits, group, sym = spec["bits"], spec["group_size"], bool(spec["symmetric"])
    granularity = PerAxis(0) if group == -1 else PerGroup(group)
    if bits == 8 and sym:
        return Int8WeightOnlyConfig(granularity=PerRow() if group == -1 else PerGroup(group))
    if bits == 4 and not sym:
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group)
    mapping = MappingType.SYMMETRIC if sym else MappingType.ASYMMETRIC
    int4 = torch.int4  # type: ignore[attr-defined]  # torch >= 2.6 has it; its type stubs do not list it
    return IntxWeightOnlyConfig(weight_dtype=torch.int8 if bits == 8 else int4, granularity=granularity, mapping_type=mapping)


def _torchao_quantize(module: nn.Module, spec: dict[str, Any], excluded: Sequence[str]) -> None:
    from torchao.quantization import quantize_

    skip = set(excluded)
    group = spec.get("group_size", -1)
    packed_int4 = spec["kind"] == "weight-only" and spec["bits"] == 4 and not spec["symmetric"]

    def keep(mod: nn.Module, fqn: str) -> bool:
        if not isinstance(mod, nn.Linear) or fqn in skip:
            return False
        # Layers whose shape a kernel cannot take stay float (and show in layer_report): the input
        # width must divide by the group; the packed int4 kernel also needs outputs in 16s.
        if spec["kind"] == "weight-only" and group != -1 and mod.in_features % group:
            return False
        return not packed_int4 or mod.out_features % PACKED_INT4_OUT_MULTIPLE == 0

    quantize_(module, torchao_config(spec), filter_fn=keep)


def _example_args(batches: list[dict[str, np.ndarray]], names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """The calibration batch with the most rows (then tokens): sizes of 1 would be specialised."""
    best = max(batches, key=lambda b: tuple(np.asarray(b[names[0]]).shape[:2]))
    return tuple(torch.from_numpy(np.ascontiguousarray(best[n])) for n in names)


def _dynamic_shapes(args: tuple[torch.Tensor, ...]) -> tuple[dict[int, Any], ...]:
    """Batch dynamic for every input; the sequence too for token inputs (integer, 2-D+)."""
    from torch.export import Dim

    out = []
    for a in args:
        dims = {0: Dim.AUTO}
        if a.ndim >= 2 and not a.is_floating_point():
            dims[1] = Dim.AUTO
        out.append(dims)
    return tuple(out)


def static_int8(
    module: nn.Module,
    batches: list[dict[str, np.ndarray]],
    input_names: Sequence[str],
    excluded: Sequence[str] = (),
    *,
    reduce_range: bool = False,
) -> nn.Module:
    """PT2E static int8 (X86InductorQuantizer), observed on ``batches``: a q/dq GraphModule."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    args = _example_args(batches, input_names)
    try:
        exported = torch.export.export(module, args, dynamic_shapes=_dynamic_shapes(args)).module()
    except Exception as exc:  # torch.export raises many types; all mean "cannot trace this model"
        raise OptimizationError(
            f"torch.export could not trace this model for static int8 ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}).",
            hint="Use dynamic-int8 on torch, or static-int8 on runtime onnxruntime / openvino.",
        ) from exc
    # Unused outputs (a BERT pooler behind last_hidden_state) leave partitions with no output,
    # which the quantizer's pattern matching cannot annotate.
    exported.graph.eliminate_dead_code()
    exported.recompile()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    for name in excluded:
        quantizer.set_module_name_qconfig(name, None)
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(*(torch.from_numpy(np.ascontiguousarray(batch[n])) for n in input_names))
    converted = convert_pt2e(prepared)
    _drop_unused_tensors(converted)
    return converted


def _drop_unused_tensors(gm: torch.fx.GraphModule) -> None:
    """convert_pt2e folds int8 copies of the weights in and leaves the float ones registered: free them."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, leaf)


# -- what was done ----------------------------------------------------------------------------
def layer_report(module: nn.Module) -> dict[str, Any]:
    """Which layers hold quantized weights, which kept float ones, and the weights' bytes."""
    quantized: list[str] = []
    floating: list[str] = []
    if isinstance(module, torch.fx.GraphModule) and any(_is_dq(n) for n in module.graph.nodes):
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default):
                stack = node.meta.get("nn_module_stack") or {}
                name = list(stack.values())[-1][0] if stack else node.name
                (quantized if _is_dq(node.args[1]) else floating).append(name)
    else:
        for name, mod in module.named_modules():
            if isinstance(mod, nn.Linear):
                (floating if type(mod.weight) in (torch.Tensor, nn.Parameter) else quantized).append(name)
    return {"quantized_layers": len(quantized), "float_layers": floating, "weight_bytes": weight_bytes(module)}


def _is_dq(node: Any) -> bool:
    target = getattr(node, "target", None)
    return getattr(node, "op", None) == "call_function" and "dequantize" in str(target)


def weight_bytes(module: nn.Module) -> int:
    """Bytes the parameters and buffers take in memory (torchao's packed tensors counted as stored)."""
    total = 0
    seen: set[int] = set()
    tensors = list(module.parameters()) + list(module.buffers())
    if isinstance(module, torch.fx.GraphModule):
        tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        names = getattr(t, "tensor_data_names", None)
        if names:
            for attr in list(names) + list(getattr(t, "optional_tensor_data_names", None) or []):
                inner = getattr(t, attr, None)
                if isinstance(inner, torch.Tensor):
                    total += inner.numel() * inner.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's ``compute_error``): higher is closer."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = np.linalg.norm(ref - np.asarray(actual, dtype=np.float64))
    if noise == 0:
        return float("inf")
    return float(20 * np.log10(np.linalg.norm(ref) / noise))


# -- calibration batches on disk ----------------------------------------------------------------
def save_batches(path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    """Batches (of varying shapes) as one ``.npz``: key ``b0003/input_ids`` is batch 3's ids."""
    arrays = {f"b{i:04d}/{name}": np.ascontiguousarray(arr) for i, batch in enumerate(batches) for name, arr in batch.items()}
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub lets **kwds reach allow_pickle; every value is an array


def load_batches(path: Path) -> list[dict[str, np.ndarray]]:
    if not path.is_file():
        raise ConfigError(f"The calibration file '{path}' does not exist.", hint="Rebuild the variant: its folder lacks calibration.npz.")
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            index, name = key.split("/", 1)
            out.setdefault(int(index[1:]), {})[name] = data[key]
    return [out[i] for i in sorted(out)]


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy (so transforms never touch a module the caller still holds)."""
    return copy.deepcopy(module)
