"""One small GPTQ int4 stories260k variant per test session, shared by the test files that need one
(tests/export/test_onnx_gptq.py exports it, tests/serving/test_openai_client_gptq.py serves it).

The recipe's GPTQ step (recipes/llm-int4.yaml: 4 bits, per channel, asymmetric, damping 0.01) on 8
calibration windows of 64 tokens instead of 64 of 128: the same algorithm and layout in a few seconds.
"""

from __future__ import annotations

from pathlib import Path

GPTQ_STEP = {
    "technique": "gptq",
    "bits": 4,
    "group_size": -1,
    "symmetric": False,
    "damping": 0.01,
    "calibration": {"dataset": "tinystories", "samples": 8, "seq_len": 64},
}
_BUILT: dict[str, Path] = {}


def gptq_stories260k(tmp_path_factory, stories260k: Path, data_dir: Path) -> Path:
    """The variant's folder (``decoder.xml``, ``engine.json``, tokenizer, manifest), built on first use in this session."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        from modelpress.optimize.techniques import apply_technique

        out = tmp_path_factory.mktemp("gptq-stories260k") / "gptq"
        apply_technique(stories260k, GPTQ_STEP, out, data_dir=data_dir)
        _BUILT[key] = out
    return _BUILT[key]
