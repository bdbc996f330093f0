"""LLM weight quantization on the KV-cache decoder (RTN, GPTQ, AWQ by NNCF), on the real stories260k.

One recipe (mode: branch) makes the three 4-bit variants side by side with a small calibration
set; the tests read what it wrote. Quality is deterministic (NNCF and OpenVINO f32 on CPU).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from modelpress.errors import ConfigError, UnsupportedModelError
from modelpress.optimize.configs import parse_step

pytestmark = pytest.mark.needs_data  # stories260k and TinyStories from the shared data folder

# The handlers this file tests (tests/optimize/test_ort_ov.py checks every handler is covered).
COVERED = {
    ("WeightOnly", "openvino-decoder"),
    ("GPTQ", "openvino-decoder"),
    ("AWQ", "openvino-decoder"),
    ("SmoothQuant", "openvino-decoder"),
}
# stories260k's float perplexity on the five TinyStories stories (data README: about 3.55).
FLOAT_PPL = 3.548
# The decoder graph in f32 against PyTorch eager: the same perplexity to float32 rounding.
SAME_GRAPH_PPL_RTOL = 1e-4
F32 = {"precision": "f32"}
# W8A8 moves stories260k's perplexity by about 1.6% (64 calibration windows); a few windows, a little more.
W8A8_MAX_PPL_RATIO = 1.05
# Without VNNI (AVX2 only) int8 matmuls multiply u8 x s8 with vpmaddubsw, whose int16 pair sums saturate: measured
# 1.059x on an AMD EPYC with AVX2 (2026-12-07). The same known AVX2 effect ORT's reduce_range works around.
W8A8_MAX_PPL_RATIO_NO_VNNI = 1.08
SMALL_CALIBRATION = {"dataset": "tinystories", "samples": 8, "seq_len": 64}


def test_configs_name_the_llm_techniques_and_refuse_what_nncf_cannot_do():
    gptq = parse_step({"technique": "gptq", "group_size": 32, "scale_estimation": True, "damping": 0.05})
    assert (
        gptq.runtime == "openvino-decoder" and gptq.label() == "gptq@openvino-decoder(group_size=32, scale_estimation=True, damping=0.05)"
    )
    assert (
        parse_step(
            {"technique": "weight-only", "runtime": "openvino-decoder", "bits": 4, "group_size": -1, "symmetric": False}
        ).effective_group_size
        == -1
    )
    assert parse_step({"technique": "smoothquant"}).alpha == 0.95
    cases = [
        ({"technique": "gptq", "act_order": True}, "no activation ordering"),
        ({"technique": "awq", "bits": 8}, "changes 4-bit weights only"),
        ({"technique": "awq", "runtime": "openvino"}, "awq has no openvino implementation; it runs on openvino-decoder"),
        ({"technique": "gptq", "group_size": 48}, "power of two"),
        ({"technique": "gptq", "damp": 0.1}, "Did you mean 'damping'"),
        ({"technique": "awq", "alpha_min": 0.8, "alpha_max": 0.2}, "must not exceed alpha_max"),
        ({"technique": "weight-only", "runtime": "openvino-decoder", "bits": 8, "group_size": 32}, "per output channel"),
    ]
    for step, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_step(step)


@pytest.fixture(scope="module")
def int4(tmp_path_factory, stories260k, data_dir):
    """RTN, GPTQ and AWQ at 4 bits, groups of 32, side by side (the stories260k runs of recipes/llm-int4.yaml, smaller)."""
    from modelpress.optimize.recipe import run_recipe

    steps = [
        {"technique": "weight-only", "runtime": "openvino-decoder", "bits": 4, "group_size": -1, "symmetric": False},
        {"technique": "gptq", "bits": 4, "group_size": -1, "symmetric": False, "calibration": SMALL_CALIBRATION},
        {"technique": "awq", "bits": 4, "group_size": -1, "symmetric": False, "steps": 10, "calibration": SMALL_CALIBRATION},
    ]
    recipe = {"mode": "branch", "on_failure": "skip", "gate": {"perplexity": {"min_recovery": 0.5}}, "steps": steps}
    return run_recipe(stories260k, recipe, tmp_path_factory.mktemp("llm-int4"), data="tinystories", data_dir=data_dir)


@pytest.mark.slow
def test_rtn_gptq_and_awq_side_by_side_on_the_graph_that_generates(int4):
    assert int4.original["metrics"]["perplexity"] == pytest.approx(FLOAT_PPL, abs=1e-3)
    rtn, gptq, awq = int4.steps
    assert [s.shipped for s in int4.steps] == [True, True, True], [s.error for s in int4.steps]
    ppl = {s.config["technique"]: s.evaluation["metrics"]["perplexity"] for s in int4.steps}
    assert all(s.evaluation["runtime"] == "openvino-decoder" for s in int4.steps)
    # 4 bits cost perplexity; GPTQ gives some of it back against round-to-nearest, AWQ is never worse
    assert ppl["weight-only"] > FLOAT_PPL * 1.05
    assert ppl["gptq"] < ppl["weight-only"] - 0.05
    assert ppl["awq"] <= ppl["weight-only"]
    for s in int4.steps:
        agreement = s.evaluation["agreement"]["top1_agreement"]
        assert 0.5 < agreement < 1.0  # the variants change some greedy tokens, not most
        assert {r.metric for r in s.gate.rows} == {"perplexity"}
    assert gptq.technique["calibration"]["dataset"] == "tinystories" and gptq.technique["calibration"]["tokens"] == 8 * 64
    assert rtn.technique["algorithm"] == "int4-rtn" and awq.technique["algorithm"] == "int4-awq"


@pytest.mark.slow
def test_the_variant_is_a_decoder_folder_the_engine_serves_and_evaluate_scores(int4, data_dir):
    from pathlib import Path

    from modelpress.artifacts import Artifact
    from modelpress.cli.main import app
    from modelpress.generation import SamplingParams, create_engine
    from modelpress.generation.openvino_engine import FORMAT_VERSION
    from modelpress.runtimes import runtime_of

    folder = Path(int4.steps[1].path)
    meta = json.loads((folder / "engine.json").read_text())
    assert meta == {
        "format_version": FORMAT_VERSION,
        "quantize": "int4-gptq",
        "model_type": "llama",
        "all_logits": True,
        "precision": "f32",
    }
    assert {"decoder.xml", "decoder.bin", "config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    art = Artifact.open(folder)
    assert runtime_of(art) == "openvino-decoder" and art.manifest.step["technique"] == "gptq"

    eng = create_engine(folder, engine="openvino", precision="f32")
    eng.start()
    try:
        out = eng.generate(eng.encode("Once upon a time"), SamplingParams(max_tokens=8, temperature=0, stop_token_ids=()))
        assert eng.quantize == "int4-gptq" and len(out.token_ids) == 8
    finally:
        eng.stop()

    result = CliRunner().invoke(app, ["evaluate", str(folder), "--data", "tinystories", "--data-dir", str(data_dir), "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.output[result.output.index("{") :])
    assert scored["runtime"] == "openvino-decoder"
    assert scored["metrics"]["perplexity"] == pytest.approx(int4.steps[1].evaluation["metrics"]["perplexity"], rel=SAME_GRAPH_PPL_RTOL)


def test_the_decoder_runtime_scores_the_float_model_as_pytorch_does(stories260k, data_dir):
    import modelpress as mp
    import modelpress.optimize.techniques  # registers the openvino-decoder converter

    got = mp.evaluate(str(stories260k), data="tinystories", data_dir=data_dir, runtime="openvino-decoder")
    assert got["metrics"]["perplexity"] == pytest.approx(FLOAT_PPL, abs=1e-3)
    with pytest.raises(UnsupportedModelError, match="runs causal LMs"):
        mp.create_runner(mp.load("minilm"), "openvino-decoder").load()


@pytest.mark.slow
def test_smoothquant_w8a8_runs_on_the_decoder_graph(stories260k, data_dir, tmp_path):
    import modelpress as mp
    from modelpress.optimize.techniques import apply_technique

    step = {"technique": "smoothquant", "alpha": 0.95, "calibration": {**SMALL_CALIBRATION, "samples": 4}}
    art = apply_technique(stories260k, step, tmp_path / "w8a8", data_dir=data_dir)
    assert art.manifest.metrics["technique"]["ops"]["FakeQuantize"] > 0  # int8 activations: int8 matmuls
    assert json.loads((art.path / "engine.json").read_text())["quantize"] == "w8a8-smoothquant"
    got = mp.evaluate(str(art.path), data="tinystories", data_dir=data_dir)
    from modelpress.optimize.search.presets import detect_preset

    ratio = W8A8_MAX_PPL_RATIO if detect_preset() == "x86-avx512-vnni" else W8A8_MAX_PPL_RATIO_NO_VNNI
    assert FLOAT_PPL < got["metrics"]["perplexity"] < FLOAT_PPL * ratio


def test_calibration_text_comes_from_the_training_split_of_the_evaluation_data(tmp_path):
    from modelpress.optimize.configs.llm import DecoderCalibration
    from modelpress.optimize.handlers import StepContext
    from modelpress.optimize.quantize.llm import calibration_dataset

    ctx = StepContext(tmp_path)
    assert calibration_dataset(DecoderCalibration(), ctx) == ("tinyshakespeare-train", "the default corpus")
    ctx.data = "tinyshakespeare-test"  # what the step pipeline evaluates on (--data)
    assert calibration_dataset(DecoderCalibration(), ctx)[0] == "tinyshakespeare-train"
    ctx.data = "tinystories"  # no training split: the evaluation text itself, and the manifest says so
    assert calibration_dataset(DecoderCalibration(), ctx) == ("tinystories", "the evaluation dataset (it has no training split)")
    assert calibration_dataset(DecoderCalibration(dataset="wikitext2-test"), ctx)[0] == "wikitext2-test"
