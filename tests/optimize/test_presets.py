"""Hardware presets: expansion into full configs, detection from CPU flags, unknown names."""

import platform
from pathlib import Path

import pytest

from modelpress.errors import UnknownTechniqueError
from modelpress.optimize.configs import DynamicInt8, Precision, StaticInt8, TechniqueConfig, step_from_yaml
from modelpress.optimize.handlers import HANDLERS
from modelpress.optimize.search.candidates import peer_candidates
from modelpress.optimize.search.presets import PRESETS, TASKS, detect_preset, expand_preset

VNNI_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_int8\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
AVX2_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
ARM_CPU = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimdhp\n"


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("task", TASKS)
def test_every_preset_expands_to_valid_configs_with_handlers(name, task):
    from modelpress.optimize import techniques  # noqa: F401  (registers the handlers)

    configs = expand_preset(name, task)
    assert configs and all(isinstance(c, TechniqueConfig) for c in configs)
    labels = [c.label() for c in configs]
    assert len(set(labels)) == len(labels), labels  # no candidate twice
    for cfg in configs:
        assert (type(cfg), cfg.runtime) in HANDLERS, f"{name}/{task}: {cfg.label()} has no handler"
        assert step_from_yaml(cfg.to_yaml()) == cfg  # a preset is made of full, storable configs


def test_avx512_vnni_leads_with_the_measured_winners():
    configs = expand_preset("x86-avx512-vnni", "embedding")
    # NNCF static int8, bf16 hint (6.45x), calibrated on nncf.quantize's default 300 samples (64 lost top-10 agreement)
    assert configs[0] == StaticInt8(runtime="openvino", precision_hint="bf16", calibration={"samples": 300})
    peer = [c.config for c in peer_candidates("embedding") if c.peer == "OpenVINO + NNCF static int8"]
    assert peer == [configs[0]]  # the peer's recipe as NNCF runs it, the same config
    assert DynamicInt8(runtime="onnxruntime", per_channel=True, fuse=True) in configs
    assert Precision(runtime="openvino", dtype="bf16") in configs
    llm = expand_preset("x86-avx512-vnni", "causal-lm")
    assert llm and all(c.runtime == "openvino-decoder" for c in llm)  # decoders the generation engine runs


def test_avx2_reduces_the_int8_range_and_drops_bf16():
    configs = expand_preset("x86-avx2", "embedding")
    ort = [c for c in configs if isinstance(c, DynamicInt8) and c.runtime == "onnxruntime"]
    assert ort and all(c.reduce_range for c in ort)
    assert not any(getattr(c, "precision_hint", None) == "bf16" or getattr(c, "dtype", None) == "bf16" for c in configs)


def test_runtimes_filter():
    only = expand_preset("x86-avx512-vnni", "embedding", runtimes=["onnxruntime"])
    assert only and {c.runtime for c in only} == {"onnxruntime"}


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UnknownTechniqueError) as err:
        expand_preset("x86-avx512", "embedding")
    assert "Did you mean 'x86-avx512-vnni'?" in str(err.value)
    for name in PRESETS:
        assert name in err.value.hint
    with pytest.raises(UnknownTechniqueError, match="no candidates for task 'speech'"):
        expand_preset("arm64", "speech")


@pytest.mark.parametrize(
    "cpuinfo,machine,gpu,expected",
    [
        (VNNI_CPU, "x86_64", False, "x86-avx512-vnni"),
        (AVX2_CPU, "x86_64", False, "x86-avx2"),
        ("", "AMD64", False, "x86-avx2"),  # Windows: no /proc/cpuinfo
        (ARM_CPU, "aarch64", False, "arm64"),
        ("", "arm64", False, "arm64"),  # macOS on Apple silicon
        (VNNI_CPU, "x86_64", True, "nvidia"),
    ],
)
def test_detect_preset(cpuinfo, machine, gpu, expected):
    assert detect_preset(cpuinfo=cpuinfo, machine=machine, gpu=gpu) == expected


def test_detect_preset_reads_this_machine():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or platform.machine() != "x86_64":
        pytest.skip("reads /proc/cpuinfo of an x86-64 Linux machine")
    text = cpuinfo.read_text()
    expected = "x86-avx512-vnni" if "avx512_vnni" in text or "amx_int8" in text else "x86-avx2"
    assert detect_preset(gpu=False) == expected
