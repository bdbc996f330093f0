"""The GPTQ int4 stories260k (an ``openvino-decoder`` variant) exported to ONNX with its KV cache:
`modelpress export VARIANT --format onnx` writes ``model.onnx`` and ``decoder.onnx`` whose linear layers
are ``MatMulNBits`` holding the very codes, scales and zero points GPTQ chose (not a re-quantization),
checked against the OpenVINO decoder; ONNX Runtime generates the variant's greedy tokens and scores its
perplexity; what cannot be carried over is refused clearly and a graph that differs is never written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import modelpress as mp
from modelpress.cli.main import app
from modelpress.errors import ConfigError, ParityError, UnsupportedModelError
from modelpress.export import onnx_decoder, onnx_nbits
from modelpress.generation import SamplingParams, create_engine

from .._gptq import gptq_stories260k

pytestmark = [pytest.mark.needs_data, pytest.mark.slow]  # stories260k and TinyStories from the shared data folder; a GPTQ build
pytest.importorskip("onnxruntime")
pytest.importorskip("nncf")

GREEDY = SamplingParams(max_tokens=32, temperature=0, stop_token_ids=())
PROMPTS = ["Once upon a time", "The little dog"]
LAYERS, LINEARS = 5, 7  # stories260k: 5 decoder layers of q, k, v, o, gate, up, down
FLOAT_BYTES_LEFT = 32_000  # scales (one per output channel) and norm weights: ~18 kB on stories260k
# The same weights on two runtimes: the perplexities agree to float32 rounding of the sums.
SAME_WEIGHTS_PPL_RTOL = 1e-4


@pytest.fixture(scope="module")
def gptq(tmp_path_factory, stories260k, data_dir):
    return gptq_stories260k(tmp_path_factory, stories260k, data_dir)


@pytest.fixture(scope="module")
def exported(gptq, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq-onnx") / "onnx"
    # --legacy (the TorchScript exporter): seconds; the dynamo exporter, the default, gives the same graph
    # structure for this rewrite (MatMul of a transposed weight) and is measured in docs/llm-compression.md
    result = CliRunner().invoke(app, ["export", str(gptq), "--format", "onnx", "-o", str(out), "--legacy"])
    assert result.exit_code == 0, result.output
    assert "parity max-abs-diff" in result.output
    return out


def _nbits_nodes(path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [(n, inits) for n in model.graph.node if n.op_type == "MatMulNBits"], model


def test_the_export_is_checked_against_the_openvino_variant(exported, gptq):
    art = mp.load(exported)
    assert art.format == "onnx" and art.manifest.model_file == "model.onnx" and not art.verify()
    step, metrics = art.manifest.step, art.manifest.metrics
    assert step["weights"] == "int4-gptq" and step["kv_decoder"] == onnx_decoder.DECODER_FILE
    assert art.manifest.parent == mp.load(gptq).content_hash()  # the lineage: exported from the variant
    parity = metrics["kv_decoder_parity"]
    assert parity["tokens_equal"] and parity["logits_max_abs_diff"] <= parity["logits_tolerance"]
    assert metrics["parity_max_abs_diff"]["logits"] <= metrics["parity_max_abs_diff"]["logits_tolerance"]
    # every linear layer int4, the tied embedding/lm_head as NNCF keeps it (int8): MatMulNBits, the embedding's Gather a DequantizeLinear
    assert metrics["nbits"] == {"MatMulNBits": LAYERS * LINEARS + 1, "DequantizeLinear": 1}
    meta = json.loads((exported / onnx_decoder.META_FILE).read_text())
    assert meta["quantize"] == "int4-gptq" and meta["parity"]["reference"] == "openvino-decoder f32"
    # no float weight matrix is left: the float initializers are the scales and the norms' weights (the float
    # model's weights take 1.04 MB)
    _, model = _nbits_nodes(exported / onnx_decoder.DECODER_FILE)
    floats = sum(len(i.raw_data) for i in model.graph.initializer if i.data_type == 1)  # TensorProto.FLOAT
    assert floats < FLOAT_BYTES_LEFT, floats


def test_the_onnx_graph_holds_the_codes_gptq_chose(exported, gptq):
    """Each MatMulNBits' codes, scales and zero points are the IR's constants, read back by OpenVINO itself."""
    import openvino as ov
    import openvino.opset13 as ops

    model = ov.Core().read_model(str(gptq / "decoder.xml"))
    consts = {op.get_friendly_name(): op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"}

    def values(name):  # OpenVINO converts its own u4 constant: no unpacking of ours involved
        compiled = ov.Core().compile_model(ov.Model([ops.convert(consts[name], "u8")], []), "CPU")
        return next(iter(compiled({}).values()))

    nodes, _ = _nbits_nodes(exported / onnx_decoder.DECODER_FILE)
    weights, _ = onnx_nbits.read_ir(gptq / "decoder.xml")
    by_scales = {q.scale.tobytes(): name for name, q in weights.items()}
    checked = 0
    for node, inits in nodes:
        attrs = {a.name: a.i for a in node.attribute}
        if attrs["bits"] != 4:
            continue
        name = by_scales[inits[node.input[2]].astype(np.float32).reshape(-1, 1).tobytes()]
        n, k = attrs["N"], attrs["K"]
        packed = inits[node.input[1]].reshape(n, -1)
        codes = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, -1)[:, :k]
        assert np.array_equal(codes, values(f"self.{name}")), name
        zp = inits[node.input[3]].reshape(n, -1)[:, 0] & 0x0F
        assert np.array_equal(zp, values(f"self.{name}/zero_point").reshape(-1)), name
        assert np.array_equal(inits[node.input[2]].reshape(-1), consts[f"self.{name}/scale"].get_data().astype(np.float32).reshape(-1))
        checked += 1
    assert checked == LAYERS * LINEARS


def test_onnxruntime_generates_and_scores_as_the_variant(exported, gptq, data_dir):
    ref = create_engine(gptq, "openvino", precision="f32")
    eng = create_engine(exported, "onnxruntime")
    assert eng.name == "onnxruntime"
    ref.start()
    eng.start()
    try:
        want = [ref.generate(ref.encode(p), GREEDY).token_ids for p in PROMPTS]
        assert eng.generate(eng.encode(PROMPTS[0]), GREEDY).token_ids == want[0]
        with eng._lock:  # admitted together: one left-padded prefill, then shared decode steps
            handles = [eng.submit(eng.encode(p), GREEDY) for p in PROMPTS]
        assert [h.result(60).token_ids for h in handles] == want
    finally:
        eng.stop()
        ref.stop()
    onnx_ppl = mp.evaluate(str(exported), data="tinystories", data_dir=data_dir)
    ov_ppl = mp.evaluate(str(gptq), data="tinystories", data_dir=data_dir)
    assert onnx_ppl["runtime"] == "onnxruntime" and ov_ppl["runtime"] == "openvino-decoder"
    assert onnx_ppl["metrics"]["perplexity"] == pytest.approx(ov_ppl["metrics"]["perplexity"], rel=SAME_WEIGHTS_PPL_RTOL)


def test_a_graph_with_other_codes_fails_the_check_and_is_never_written(gptq, tmp_path, monkeypatch):
    real = onnx_nbits._nbits_inputs

    def shifted(q, block):  # every code one step up (clipped): what a re-quantization that chose other codes looks like
        b, scales, zp = real(q, block)
        if q.bits == 4:
            lo, hi = np.minimum((b & 0x0F) + 1, 15), np.minimum((b >> 4) + 1, 15)
            b = (lo | (hi << 4)).astype(np.uint8)
        return b, scales, zp

    monkeypatch.setattr(onnx_nbits, "_nbits_inputs", shifted)
    with pytest.raises(ParityError, match="differs from its source"):
        mp.export(str(gptq), "onnx", tmp_path / "out", dynamo=False)
    assert not (tmp_path / "out").exists()


def test_what_cannot_be_carried_over_is_refused(gptq, exported, tmp_path):
    awq = tmp_path / "awq"
    shutil.copytree(gptq, awq)
    meta = json.loads((awq / "engine.json").read_text())
    (awq / "engine.json").write_text(json.dumps({**meta, "quantize": "int4-awq"}))
    with pytest.raises(UnsupportedModelError, match="AWQ rescales float weights"):
        mp.export(str(awq), "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="already holds int4-gptq weights"):
        create_engine(exported, "onnxruntime", quantize="int4")
