"""The onnxruntime engine against the reference: the KV-cache ONNX decoder on ONNX Runtime gives the
torch engine's greedy tokens alone and in a changing batch (stories260k), a Hugging Face folder is
exported once into the cache, int8/int4 run the same loop, bad options are clear errors."""

from __future__ import annotations

import pytest

import modelpress as mp
from modelpress.errors import ConfigError, InvalidInputError, UnsupportedModelError
from modelpress.generation import SamplingParams, create_engine

pytest.importorskip("onnxruntime")

GREEDY = SamplingParams(max_tokens=60, temperature=0, stop_token_ids=())
PROMPTS = ["Once upon a time", "The cat sat", "Lily and Tom went to the"]
# int8 weights follow fp32's greedy path on this tiny model (measured: 8 of 8 tinystories prompts
# identical over 32 tokens); the first 8 tokens are asserted. int4 and int8-dynamic part from it early.
INT8_AGREE_PREFIX = 8


@pytest.fixture(scope="module")
def exported(stories260k, tmp_path_factory):
    # the TorchScript exporter: seconds, where the dynamo exporter takes ~15 s per graph here (it is tested on
    # tiny_llama below); the parity check on generated tokens runs the same
    return mp.export(stories260k, "onnx", tmp_path_factory.mktemp("ort-generation") / "stories", dynamo=False).path


@pytest.fixture(scope="module")
def reference(stories260k):
    eng = create_engine(stories260k, engine="torch", threads=1)
    eng.start()
    yield {p: eng.generate(eng.encode(p), GREEDY).token_ids for p in PROMPTS}
    eng.stop()


def test_greedy_equals_the_reference_alone_and_batched(exported, reference):
    eng = create_engine(exported, engine="onnxruntime", threads=1)
    eng.start()
    try:
        assert eng.name == "onnxruntime" and eng.quantize is None
        for p in PROMPTS:
            assert eng.generate(eng.encode(p), GREEDY).token_ids == reference[p]
        with eng._lock:  # admitted together: one left-padded prefill, then shared decode steps
            handles = [eng.submit(eng.encode(p), GREEDY) for p in PROMPTS]
        assert [h.result(60).token_ids for h in handles] == [reference[p] for p in PROMPTS]
        first = eng.submit(eng.encode(PROMPTS[1]), SamplingParams(max_tokens=100, temperature=0, stop_token_ids=()))
        for _, _event in zip(range(5), first, strict=False):  # it is decoding ...
            pass
        late = eng.submit(eng.encode(PROMPTS[0]), GREEDY)  # ... when this one joins, and leaves before it ends
        assert late.result(60).token_ids == reference[PROMPTS[0]] and first.result(60).token_ids[:60] == reference[PROMPTS[1]]
        r = eng.generate(eng.encode("Once upon a time"), SamplingParams(max_tokens=400, temperature=0))
        assert r.finish_reason == "stop"  # the model's stop ids (from decoder.json) end the story
    finally:
        eng.stop()


@pytest.mark.parametrize("quantize", ["int8", "int4", "int8-dynamic"])
def test_quantized_decoders_generate(exported, reference, quantize, tmp_path):
    eng = create_engine(exported, engine="onnxruntime", quantize=quantize, cache_dir=tmp_path, threads=1)
    eng.start()
    try:
        r = eng.generate(eng.encode("Once upon a time"), GREEDY)
        assert r.completion_tokens == GREEDY.max_tokens and "Lily" in r.text
        if quantize == "int8":
            assert r.token_ids[:INT8_AGREE_PREFIX] == reference["Once upon a time"][:INT8_AGREE_PREFIX]
        assert eng.decoder_path.parent.parent == tmp_path and f"-{quantize}-" in eng.decoder_path.parent.name
    finally:
        eng.stop()


def test_a_hugging_face_folder_is_exported_once_into_the_cache(tiny_llama, tmp_path):
    # the engine's own export: the dynamo exporter, checked on generated tokens
    ref = create_engine(tiny_llama, engine="torch", threads=1)
    eng = create_engine(tiny_llama, engine="onnxruntime", cache_dir=tmp_path, threads=1)
    ref.start()
    eng.start()
    try:
        ids = ref.encode("the cat")
        params = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=())
        assert eng.generate(ids, params).token_ids == ref.generate(ids, params).token_ids
    finally:
        eng.stop()
        ref.stop()
    assert eng.session.meta["exporter"] == "dynamo"
    again = create_engine(tiny_llama, engine="onnxruntime", cache_dir=tmp_path)
    assert again.decoder_path == eng.decoder_path and again.export_seconds < 2  # read from the cache, not exported


def test_bad_inputs_are_clear_errors(exported, tmp_path):
    with pytest.raises(ConfigError, match="quantize='int8', 'int4', 'int8-dynamic' or None"):
        create_engine(exported, engine="onnxruntime", quantize="int3")
    eng = create_engine(exported, engine="onnxruntime", threads=1)
    with pytest.raises(InvalidInputError, match="max_tokens"):
        eng.submit(eng.encode("Once upon a time"), SamplingParams(max_tokens=10_000))
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        eng.submit([1, 512], SamplingParams(max_tokens=4))
    (tmp_path / "modelpress.json").write_text((exported / "modelpress.json").read_text())  # an ONNX artifact without decoder.onnx
    with pytest.raises(UnsupportedModelError, match="no KV-cache decoder"):
        create_engine(tmp_path, engine="onnxruntime")
    with pytest.raises(UnsupportedModelError, match="onnxruntime"):
        create_engine(exported, engine="nope")
