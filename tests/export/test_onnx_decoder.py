"""ONNX with a KV cache: `modelpress export CAUSAL_LM --format onnx` writes ``decoder.onnx`` (past
keys and values in and out) checked on generated tokens; ONNX Runtime generates with it exactly
the torch reference's greedy tokens; a broken graph fails the check loudly and is never written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import modelpress as mp
from modelpress.cli.main import app
from modelpress.errors import ConfigError, ParityError, UnsupportedModelError
from modelpress.export import onnx_decoder
from modelpress.generation import SamplingParams, create_engine
from modelpress.tasks import task_for

pytest.importorskip("onnxruntime")

GREEDY = SamplingParams(max_tokens=40, temperature=0, stop_token_ids=())


@pytest.fixture(scope="module")
def stories(stories260k):
    return stories260k


@pytest.fixture(scope="module")
def exported(stories, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-kv") / "stories-onnx"
    # --legacy (the TorchScript exporter): seconds where the dynamo exporter takes ~15 s per graph here; the
    # dynamo export of the decoder is tested on tiny_llama (tests/generation/test_onnxruntime_engine.py)
    result = CliRunner().invoke(app, ["export", str(stories), "--format", "onnx", "-o", str(out), "--legacy"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def hf_model(stories):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(stories), dtype=torch.float32).eval()


def _prompts(stories):
    task = task_for(mp.load(stories))
    return [task.encode(p) for p in onnx_decoder.PARITY_PROMPTS]


def _tamper(folder, factor: float = 1.5) -> None:
    """Scale one MLP weight of the graph in ``folder`` (a subtly broken graph: it still runs)."""
    import onnx
    from onnx import numpy_helper

    path = folder / onnx_decoder.DECODER_FILE
    model = onnx.load(str(path))
    weight = next(i for i in model.graph.initializer if list(i.dims) == [64, 172])  # stories260k's up projection
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(factor), weight.name))
    onnx.save(model, str(path))


def test_the_export_verb_writes_a_kv_decoder_that_generates_the_reference_tokens(exported, stories):
    art = mp.load(exported)
    assert art.format == "onnx" and art.manifest.model_file == "model.onnx"  # the runners' full-sequence graph stays
    assert art.manifest.step["kv_decoder"] == "decoder.onnx" and not art.verify()
    assert art.manifest.step["kv_decoder_exporter"].startswith("legacy")
    parity = art.manifest.metrics["kv_decoder_parity"]
    assert parity["tokens_equal"] and parity["logits_max_abs_diff"] <= parity["logits_tolerance"]
    meta = json.loads((exported / "decoder.json").read_text())
    assert (meta["layers"], meta["kv_heads"], meta["head_dim"], meta["context_length"]) == (5, 4, 8, 512)

    ref = create_engine(stories, "torch")
    eng = create_engine(exported, "onnxruntime")  # the exported folder, as `modelpress serve DIR --engine onnxruntime` loads it
    ref.start()
    eng.start()
    try:
        prompts = ["Once upon a time", "The cat sat"]
        want = [ref.generate(ref.encode(p), GREEDY).token_ids for p in prompts]
        assert eng.generate(eng.encode(prompts[0]), GREEDY).token_ids == want[0]  # alone
        with eng._lock:  # admitted together: one left-padded prefill, then shared decode steps
            handles = [eng.submit(eng.encode(p), GREEDY) for p in prompts]
        assert [h.result(60).token_ids for h in handles] == want
    finally:
        eng.stop()
        ref.stop()


def test_the_export_runs_only_on_the_onnxruntime_engine(exported):
    with pytest.raises(UnsupportedModelError, match="engine='onnxruntime'"):
        create_engine(exported, "torch")
    assert create_engine(exported, "auto").name == "onnxruntime"


def test_a_tampered_decoder_fails_the_parity_check(exported, hf_model, stories, tmp_path):
    for name in (onnx_decoder.DECODER_FILE, onnx_decoder.META_FILE):
        shutil.copy(exported / name, tmp_path / name)
    prompts = _prompts(stories)
    assert onnx_decoder.check_decoder(hf_model, onnx_decoder.DecoderSession(tmp_path, threads=1), prompts)["tokens_equal"]
    _tamper(tmp_path)
    with pytest.raises(ParityError, match="KV-cache decoder"):
        onnx_decoder.check_decoder(hf_model, onnx_decoder.DecoderSession(tmp_path, threads=1), prompts)


def test_a_broken_export_is_never_written(stories, tmp_path, monkeypatch):
    real = onnx_decoder.export_decoder

    def broken(hf_model, folder, **kwargs):
        how = real(hf_model, folder, **kwargs)
        _tamper(folder)
        return how

    monkeypatch.setattr(onnx_decoder, "export_decoder", broken)
    with pytest.raises(ParityError, match="KV-cache decoder"):
        mp.export(stories, "onnx", tmp_path / "out", dynamo=False)  # the TorchScript exporter: the quick one
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_clear_errors(tmp_path, exported):
    with pytest.raises(UnsupportedModelError, match="no KV-cache decoder"):
        onnx_decoder.read_meta(tmp_path)
    with pytest.raises(ConfigError, match="quantize='int8', 'int4' or 'int8-dynamic'"):
        onnx_decoder.quantize_decoder(exported, tmp_path, "int3")
    with pytest.raises(ConfigError, match="non-empty prompts"):
        onnx_decoder.check_decoder(None, onnx_decoder.DecoderSession(exported, threads=1), [[]])
