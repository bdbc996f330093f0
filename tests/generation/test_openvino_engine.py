"""The fast engine against the reference on stories260k: greedy tokens equal (fp32), the same in a
changing batch, and int8/int4 weights run the same loop (their tokens may part from fp32's)."""

from __future__ import annotations

import pytest

from modelpress.errors import ConfigError
from modelpress.generation import SamplingParams, create_engine

pytest.importorskip("openvino", reason="the openvino engine needs openvino (pip install 'modelpress[openvino]')")
pytest.importorskip("nncf", reason="the openvino engine's weight compression needs nncf")

GREEDY = SamplingParams(max_tokens=60, temperature=0, stop_token_ids=())
PROMPTS = ["Once upon a time", "The cat sat", "Lily and Tom went to the"]
# int8 weights and bf16 activations follow fp32's greedy path for a while on this tiny model: the
# first 8 tokens of the story prompt are asserted (measured: equal for 60 tokens on 2 of 3 prompts)
INT8_AGREE_PREFIX = 8


@pytest.fixture(scope="module")
def ir_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ov-generation")  # the fp32 IR, exported once for the module


@pytest.fixture(scope="module")
def reference(stories260k):
    eng = create_engine(stories260k, engine="torch")
    eng.start()
    yield {p: eng.generate(eng.encode(p), GREEDY).token_ids for p in PROMPTS}
    eng.stop()


def test_fp32_greedy_equals_the_reference_alone_and_batched(stories260k, reference, ir_cache):
    eng = create_engine(stories260k, engine="openvino", quantize=None, cache_dir=ir_cache)
    eng.start()
    try:
        assert eng.precision == "f32"
        for p in PROMPTS:
            assert eng.generate(eng.encode(p), GREEDY).token_ids == reference[p]
        with eng._lock:  # admitted together: one left-padded prefill, then shared decode steps
            handles = [eng.submit(eng.encode(p), GREEDY) for p in PROMPTS]
        assert [h.result(60).token_ids for h in handles] == [reference[p] for p in PROMPTS]
        r = eng.generate(eng.encode("Once upon a time"), SamplingParams(max_tokens=400, temperature=0))
        assert r.finish_reason == "stop"  # the model's stop ids end the story
    finally:
        eng.stop()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_compressed_weights_generate(stories260k, reference, ir_cache, quantize):
    eng = create_engine(stories260k, engine="openvino", quantize=quantize, cache_dir=ir_cache)
    eng.start()
    try:
        ids = eng.encode("Once upon a time")
        r = eng.generate(ids, GREEDY)
        assert r.completion_tokens == GREEDY.max_tokens and "Lily" in r.text
        if quantize == "int8":
            assert r.token_ids[:INT8_AGREE_PREFIX] == reference["Once upon a time"][:INT8_AGREE_PREFIX]
        assert eng.ir_path.is_file() and eng.ir_path.parent.parent == ir_cache  # compressed from the cached f32 IR
        assert f"-{quantize}-" in eng.ir_path.parent.name
    finally:
        eng.stop()


def test_unknown_quantize_is_a_config_error(stories260k):
    with pytest.raises(ConfigError, match="quantize='int8', 'int4' or None"):
        create_engine(stories260k, engine="openvino", quantize="int3")


def test_auto_picks_openvino_for_a_llama(stories260k, ir_cache):
    # precision is an openvino option: auto picks openvino even where the llamacpp engine is installed
    eng = create_engine(stories260k, engine="auto", quantize=None, precision="f32", cache_dir=ir_cache)
    assert eng.name == "openvino" and eng.export_seconds < 5  # the IR the first test exported is reused


def test_a_prebuilt_decoder_folder_runs_as_it_is(stories260k, reference, tmp_path):
    """The folder LLM quantization writes (IR + engine.json + config + tokenizer) is loaded, not
    exported again; an all-logits graph (perplexity on the graph that generates) gives the same tokens."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from modelpress.generation.openvino_engine import export_decoder

    folder = tmp_path / "decoder"
    folder.mkdir()
    for p in stories260k.iterdir():
        if p.is_file() and p.suffix in (".json", ".model") and p.name != "engine.json":
            shutil.copy(p, folder / p.name)
    export_decoder(AutoModelForCausalLM.from_pretrained(str(stories260k)).eval(), folder, all_logits=True)
    eng = create_engine(folder, engine="openvino", cache_dir=tmp_path / "unused")
    eng.start()
    try:
        assert eng.quantize is None and eng.precision == "f32" and eng.ir_path == folder / "decoder.xml"
        assert eng.generate(eng.encode("Once upon a time"), GREEDY).token_ids == reference["Once upon a time"]
    finally:
        eng.stop()
    assert not (tmp_path / "unused").exists()  # nothing exported or compressed
    meta = json.loads((folder / "engine.json").read_text())
    (folder / "engine.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(ConfigError, match="this modelpress reads format"):
        create_engine(folder, engine="openvino")
