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

Causal LMs on a CPU preset: the LLM quantization of docs/llm-compression.md on the KV-cache
decoder the OpenVINO generation engine runs (``runtime: openvino-decoder``): round-to-nearest
int8 per channel, GPTQ and AWQ int4 in groups of 32, round-to-nearest int4 in groups of 32,
SmoothQuant W8A8 where the CPU multiplies int8 in hardware (VNNI), and int8 weights with bf16
math where the CPU has bf16. Every candidate is a folder the engine runs as it is, so the tuner
times decoding itself (:mod:`modelpress.optimize.search.llm_speed`).

:func:`detect_preset` picks one from the machine's CPU flags (``/proc/cpuinfo`` on Linux,
``platform`` elsewhere) and whether torch sees a CUDA GPU.
"""

from __future__ import annotations

import difflib
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

from modelpress.errors import UnknownTechniqueError
from modelpress.optimize.configs import Calibration, DynamicInt8, Precision, PrecisionHint, StaticInt8, TechniqueConfig, WeightOnly
from modelpress.optimize.configs.llm import AWQ, GPTQ, SmoothQuant

TEXT_TASKS = ("embedding", "text-classification")
TASKS = (*TEXT_TASKS, "image-classification", "causal-lm")
# 4-bit groups of 32 input channels: the smallest power of two NNCF groups by; stories260k's widths (64, 172) divide by
# no group above 4, so its FFN falls back per layer (group_size_fallback: adjust), and larger models lose less at 32 than
# at 128 (the measurements: GPTQ with scale estimation at group 32 closed about 60% of RTN's perplexity gap)
LLM_GROUP = 32

# nncf.quantize's own default subset_size: the calibration an NNCF user gets, where modelpress's Calibration default is 64
# (enough for ONNX Runtime and torch). It matters for OpenVINO's static int8 of MiniLM (bf16 hint, whole STS-B dev split,
# 2026-12-08 on AVX-512 VNNI): top-10 agreement 0.931 with 64 samples, 0.944 with 300, 0.946 with 1,000 and 0.945 with
# 3,000 (Spearman recovery 1.000 throughout); calibrating takes 15 s instead of 10.
NNCF_SUBSET_SIZE = 300


def nncf_static_int8(precision_hint: PrecisionHint | None = None) -> StaticInt8:
    """NNCF static int8 on OpenVINO as an NNCF user runs it: ``nncf.quantize``'s default 300 calibration samples."""
    return StaticInt8(runtime="openvino", precision_hint=precision_hint, calibration=Calibration(samples=NNCF_SUBSET_SIZE))


def _decoder(*, vnni: bool, bf16: bool) -> list[TechniqueConfig]:
    """Causal LMs on a CPU: the LLM quantization of docs/llm-compression.md, best bet first."""
    out: list[TechniqueConfig] = [
        WeightOnly(runtime="openvino-decoder", bits=8),  # int8 RTN per channel: half the bytes read per token, near-lossless
        # without scale estimation: on stories260k (TinyStories sample) GPTQ alone gave perplexity 3.75-3.76, with NNCF's
        # scale estimation 3.825, no better than round-to-nearest's 3.823 (float 3.548)
        GPTQ(bits=4, group_size=LLM_GROUP),
        AWQ(bits=4, group_size=LLM_GROUP),
        WeightOnly(runtime="openvino-decoder", bits=4, group_size=LLM_GROUP),  # RTN int4: what GPTQ and AWQ must beat
    ]
    if vnni:
        out.append(SmoothQuant())  # W8A8: int8 matmuls in hardware
    if bf16:
        out.append(WeightOnly(runtime="openvino-decoder", bits=8, precision_hint="bf16"))  # small models can lose in bf16: measured
    return out


def _avx512_vnni(task: str) -> list[TechniqueConfig]:
    if task in TEXT_TASKS:
        return [
            nncf_static_int8("bf16"),
            DynamicInt8(runtime="onnxruntime", per_channel=True, fuse=True),
            Precision(runtime="openvino", dtype="bf16"),
            WeightOnly(runtime="openvino", bits=8, precision_hint="bf16"),
            DynamicInt8(runtime="torch", compile=True),
            Precision(runtime="torch", dtype="bf16", compile=True),
        ]
    if task == "image-classification":
        return [
            nncf_static_int8("bf16"),
            StaticInt8(runtime="onnxruntime", per_channel=True),
            Precision(runtime="openvino", dtype="bf16"),
            StaticInt8(runtime="torch", compile=True),
        ]
    return _decoder(vnni=True, bf16=True)  # causal-lm: decoding reads every weight once per token


def _avx2(task: str) -> list[TechniqueConfig]:
    if task in TEXT_TASKS:
        return [
            DynamicInt8(runtime="onnxruntime", per_channel=True, fuse=True, reduce_range=True),
            nncf_static_int8(),
            WeightOnly(runtime="openvino", bits=8),
            DynamicInt8(runtime="torch", compile=True),
        ]
    if task == "image-classification":
        return [
            nncf_static_int8(),
            StaticInt8(runtime="onnxruntime", per_channel=True),
            StaticInt8(runtime="torch", compile=True),
        ]
    return _decoder(vnni=False, bf16=False)


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
    return _decoder(vnni=False, bf16=False)  # OpenVINO's ARM plugin runs the same decoder IR


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
