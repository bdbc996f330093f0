"""Hardware presets: say what machine you have instead of twenty knobs.

A preset expands, per task, into the full technique configs worth trying on that machine, best
bet first (the tuner measures them all and keeps the fastest that passes the gate):

* ``x86-avx512-vnni``: x86-64 with AVX-512 VNNI (and usually BF16/AMX): int8 dot products and
  bf16 matrix multiplies in hardware. NNCF static int8 with the bf16 hint leads (6.45x over
  PyTorch fp32 on MiniLM here), then ORT dynamic int8 per-channel on the fused graph, OpenVINO
  bf16, NNCF int8 weights.
* ``x86-avx2``: x86-64 without VNNI: int8 still pays, but ORT's u8*s8 kernels can saturate
  without VNNI, so ONNX Runtime quantizes with ``reduce_range`` (7-bit weights); no bf16 hint.
* ``arm64``: ARMv8 (Graviton, Apple silicon, Ampere): ORT dynamic int8 (its ARM kernels are
  mature) and MatMulNBits 4-bit for language models; OpenVINO's ARM plugin for fp16.
* ``nvidia``: a CUDA GPU: torch fp16/bf16 under ``torch.compile`` and torchao weight-only int8/int4
  for language models (the other candidates target CPU kernels).

:func:`detect_preset` picks one from the machine's CPU flags (``/proc/cpuinfo`` on Linux,
``platform`` elsewhere) and whether torch sees a CUDA GPU.
"""

from __future__ import annotations

import difflib
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

from modelpress.errors import UnknownTechniqueError
from modelpress.optimize.configs import DynamicInt8, Precision, StaticInt8, TechniqueConfig, WeightOnly

TEXT_TASKS = ("embedding", "text-classification")
TASKS = (*TEXT_TASKS, "image-classification", "causal-lm")


def _avx512_vnni(task: str) -> list[TechniqueConfig]:
    if task in TEXT_TASKS:
        return [
            StaticInt8(runtime="openvino", precision_hint="bf16"),
            DynamicInt8(runtime="onnxruntime", per_channel=True, fuse=True),
            Precision(runtime="openvino", dtype="bf16"),
            WeightOnly(runtime="openvino", bits=8, precision_hint="bf16"),
            DynamicInt8(runtime="torch", compile=True),
            Precision(runtime="torch", dtype="bf16", compile=True),
        ]
    if task == "image-classification":
        return [
            StaticInt8(runtime="openvino", precision_hint="bf16"),
            StaticInt8(runtime="onnxruntime", per_channel=True),
            Precision(runtime="openvino", dtype="bf16"),
            StaticInt8(runtime="torch", compile=True),
        ]
    return [  # causal-lm: decoding reads every weight once per token
        WeightOnly(runtime="openvino", bits=8, symmetric=False, precision_hint="bf16"),
        WeightOnly(runtime="openvino", bits=8, symmetric=False),  # small models can lose in bf16: f32 math
        WeightOnly(runtime="openvino", bits=4, group_size=128, precision_hint="bf16"),
        Precision(runtime="openvino", dtype="bf16"),
        WeightOnly(runtime="torch", bits=8, compile=True),
        Precision(runtime="torch", dtype="bf16", compile=True),
    ]


def _avx2(task: str) -> list[TechniqueConfig]:
    if task in TEXT_TASKS:
        return [
            DynamicInt8(runtime="onnxruntime", per_channel=True, fuse=True, reduce_range=True),
            StaticInt8(runtime="openvino"),
            WeightOnly(runtime="openvino", bits=8),
            DynamicInt8(runtime="torch", compile=True),
        ]
    if task == "image-classification":
        return [
            StaticInt8(runtime="openvino"),
            StaticInt8(runtime="onnxruntime", per_channel=True),
            StaticInt8(runtime="torch", compile=True),
        ]
    return [
        WeightOnly(runtime="openvino", bits=8, symmetric=False),
        WeightOnly(runtime="openvino", bits=4, group_size=128),
        WeightOnly(runtime="onnxruntime", bits=4, group_size=32),
        WeightOnly(runtime="torch", bits=8, compile=True),
    ]


def _arm64(task: str) -> list[TechniqueConfig]:
    if task in TEXT_TASKS:
        return [
            DynamicInt8(runtime="onnxruntime", per_channel=True, fuse=True),
            StaticInt8(runtime="onnxruntime", per_channel=True),
            Precision(runtime="openvino", dtype="fp16"),
            DynamicInt8(runtime="torch", compile=True),
        ]
    if task == "image-classification":
        return [
            StaticInt8(runtime="onnxruntime", per_channel=True),
            Precision(runtime="openvino", dtype="fp16"),
            Precision(runtime="torch", dtype="fp16", compile=True),
        ]
    return [
        WeightOnly(runtime="onnxruntime", bits=4, group_size=32),
        WeightOnly(runtime="openvino", bits=8, symmetric=False, precision_hint="fp16"),
        WeightOnly(runtime="torch", bits=8, compile=True),
    ]


def _nvidia(task: str) -> list[TechniqueConfig]:
    if task == "causal-lm":
        return [
            WeightOnly(runtime="torch", bits=8, compile=True),
            WeightOnly(runtime="torch", bits=4, group_size=128, compile=True),
            Precision(runtime="torch", dtype="bf16", compile=True),
            Precision(runtime="torch", dtype="fp16", compile=True),
        ]
    return [
        Precision(runtime="torch", dtype="fp16", compile=True),
        Precision(runtime="torch", dtype="bf16", compile=True),
        DynamicInt8(runtime="torch", compile=True),
        Precision(runtime="onnxruntime", dtype="fp16"),
    ]


PRESETS: dict[str, tuple[str, Callable[[str], list[TechniqueConfig]]]] = {
    "x86-avx512-vnni": ("x86-64 with AVX-512 VNNI (Ice Lake and later Xeons, Zen 4): int8 and bf16 in hardware", _avx512_vnni),
    "x86-avx2": ("x86-64 with AVX2 but no VNNI: int8 with reduced range, fp32 float math", _avx2),
    "arm64": ("64-bit ARM (Graviton, Ampere, Apple silicon): ONNX Runtime int8 and 4-bit weights", _arm64),
    "nvidia": ("an NVIDIA GPU: torch fp16/bf16 under torch.compile, torchao weight-only for language models", _nvidia),
}


def _unknown(name: str) -> UnknownTechniqueError:
    # A preset that contains what was typed (``vnni``, ``x86-avx512``) beats the closest spelling.
    near = [p for p in PRESETS if name and name.lower() in p] or difflib.get_close_matches(name, list(PRESETS), n=1)
    return UnknownTechniqueError(
        f"Unknown hardware preset '{name}'." + (f" Did you mean '{near[0]}'?" if near else ""),
        hint=f"Known presets: {', '.join(PRESETS)}. Example: --preset x86-avx512-vnni (or leave it out to detect this machine's).",
    )


def expand_preset(name: str, task: str, *, runtimes: Sequence[str] | None = None) -> list[TechniqueConfig]:
    """The full configs preset ``name`` tries for ``task``, best bet first (optionally only ``runtimes``)."""
    if name not in PRESETS:
        raise _unknown(name)
    if task not in TASKS:
        raise UnknownTechniqueError(
            f"Preset '{name}' has no candidates for task '{task}'.", hint=f"Presets cover the tasks {', '.join(TASKS)}."
        )
    configs = PRESETS[name][1](task)
    return [c for c in configs if runtimes is None or c.runtime in runtimes]


def _cpu_flags(cpuinfo: str) -> set[str]:
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86: flags; ARM: Features
            flags.update(value.split())
    return flags


def detect_preset(*, cpuinfo: str | None = None, machine: str | None = None, gpu: bool | None = None) -> str:
    """The preset for this machine: ``nvidia`` when torch sees a CUDA GPU, else from the CPU.

    The arguments override what is read from the machine (``/proc/cpuinfo``,
    ``platform.machine()``, ``torch.cuda.is_available()``), for tests and for planning for
    another machine.
    """
    if gpu is None:
        try:
            import torch

            gpu = bool(torch.cuda.is_available())
        except ImportError:  # pragma: no cover - torch is a core dependency
            gpu = False
    if gpu:
        return "nvidia"
    arch = (machine or platform.machine()).lower()
    if arch in ("aarch64", "arm64", "armv8l", "armv8", "arm64e"):
        return "arm64"
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    flags = _cpu_flags(cpuinfo)
    if flags & {"avx512_vnni", "avx512vnni", "amx_int8"}:
        return "x86-avx512-vnni"
    return "x86-avx2"  # the baseline of any x86-64 server of the last decade (and unknown CPUs)
