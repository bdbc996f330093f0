"""Export parity is checked on the runner that will serve the export, not on a session of its own.

A runner whose outputs differ from the source (here: patched to add an offset) must fail the
export with ParityError and leave nothing behind; an exporter that opened its own ONNX Runtime or
OpenVINO session would not see the patch and would pass.
"""

from __future__ import annotations

import numpy as np
import pytest

import modelpress as mp
from modelpress.errors import ParityError
from modelpress.export.parity import PARITY_RTOL
from modelpress.runtimes.onnxruntime import OnnxRuntimeRunner
from modelpress.runtimes.openvino import OpenVINORunner


def _offset(cls, monkeypatch, offset: float) -> list[str]:
    """Patch ``cls`` to add ``offset`` to every output; returns the folders it ran from."""
    seen: list[str] = []
    original = cls._run

    def run(self, batch):
        seen.append(str(self.artifact.path))
        return {k: v + np.float32(offset) for k, v in original(self, batch).items()}

    monkeypatch.setattr(cls, "_run", run)
    return seen


@pytest.mark.parametrize("fmt,cls", [("onnx", OnnxRuntimeRunner), ("openvino", OpenVINORunner)])
def test_a_serving_runner_that_differs_fails_the_export(fmt, cls, tiny_cnn, tmp_path, monkeypatch):
    source = mp.load(tiny_cnn, task="image-classification")
    seen = _offset(cls, monkeypatch, 0.5)
    with pytest.raises(ParityError, match="differs from its source") as err:
        mp.export(source, fmt, tmp_path / "out")
    assert err.value.max_abs_diff == pytest.approx(0.5, rel=1e-3)
    assert seen and all(".out.tmp" in p for p in seen)  # the runner ran the files about to be written
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt,cls", [("onnx", OnnxRuntimeRunner), ("openvino", OpenVINORunner)])
def test_a_difference_within_the_tolerance_passes_and_is_recorded(fmt, cls, tiny_cnn, tmp_path, monkeypatch):
    source = mp.load(tiny_cnn, task="image-classification")
    small = PARITY_RTOL / 4  # the logits are of order 1, so the tolerance is at least PARITY_RTOL
    _offset(cls, monkeypatch, small)
    art = mp.export(source, fmt, tmp_path / "out")
    report = art.manifest.metrics["parity_max_abs_diff"]
    assert report["logits"] == pytest.approx(small, rel=0.05)
    assert report["logits"] <= report["logits_tolerance"]
