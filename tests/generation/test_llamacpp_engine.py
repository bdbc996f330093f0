"""The llama.cpp engine against the reference on stories260k: f32 GGUF greedy tokens equal (alone and
in one llama_batch), overlapping requests share llama_decode steps, a finished or cancelled sequence's
KV cells are removed and its slot reused, Q8_0 runs, the GGUF is cached, and llama.cpp prints nothing."""

from __future__ import annotations

import json
import time

import pytest

from modelpress.errors import ConfigError, UnsupportedModelError
from modelpress.generation import SamplingParams, create_engine

pytest.importorskip("llama_cpp", reason="the llamacpp engine needs llama-cpp-python (pip install 'modelpress[llamacpp]')")
pytest.importorskip("gguf", reason="the llamacpp engine converts models with gguf (pip install 'modelpress[llamacpp]')")

GREEDY = SamplingParams(max_tokens=60, temperature=0, stop_token_ids=())
PROMPTS = ["Once upon a time", "The cat sat", "Lily and Tom went to the"]
# Q8_0 weights follow f32's greedy path for a while on this tiny model: measured equal for 60 tokens on
# 2 of 3 prompts (the third parts at token 10); the first 8 tokens of the story prompt are asserted
Q8_AGREE_PREFIX = 8


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def reference(stories260k):
    eng = create_engine(stories260k, engine="torch")
    eng.start()
    yield {p: eng.generate(eng.encode(p), GREEDY).token_ids for p in PROMPTS}
    eng.stop()


@pytest.fixture(scope="module")
def f32(stories260k, gguf_cache):
    eng = create_engine(stories260k, engine="llamacpp", quantize=None, cache_dir=gguf_cache, max_batch_size=4)
    eng.start()
    yield eng
    eng.close()


def _slot_empty(eng, slot: int) -> bool:
    return eng._lib.llama_memory_seq_pos_max(eng._memory, slot) == -1


def test_f32_greedy_equals_the_reference_alone_and_batched(f32, reference):
    for p in PROMPTS:
        assert f32.generate(f32.encode(p), GREEDY).token_ids == reference[p]
    with f32._lock:  # admitted together: their prompts in one llama_batch, then shared steps
        handles = [f32.submit(f32.encode(p), GREEDY) for p in PROMPTS]
    assert [h.result(60).token_ids for h in handles] == [reference[p] for p in PROMPTS]
    assert set(f32.stats().step_log[-1]) <= {h.request_id for h in handles}
    r = f32.generate(f32.encode("Once upon a time"), SamplingParams(max_tokens=400, temperature=0))
    assert r.finish_reason == "stop"  # the model's stop ids end the story
    assert r.text.startswith(", there was a little girl named Lily")


def test_overlapping_requests_share_steps_and_free_their_slots(f32, reference):
    ids = f32.encode("Once upon a time")
    first = f32.submit(ids, GREEDY)
    events = iter(first)
    for _ in range(5):  # the first request is decoding before the second arrives
        next(events)
    second = f32.submit(f32.encode("The cat sat"), GREEDY)
    third = f32.submit(ids, SamplingParams(max_tokens=200, temperature=0, stop_token_ids=()))
    assert first.result(60).token_ids == reference["Once upon a time"]
    assert second.result(60).token_ids == reference["The cat sat"]
    third.cancel()
    assert third.result(60).finish_reason in ("cancelled", "length")
    log = f32.stats().step_log
    shared = [s for s in log if first.request_id in s and second.request_id in s]
    assert shared and any(first.request_id in s and second.request_id not in s for s in log)
    # every finished or cancelled sequence's cells are gone and its slot is free again
    deadline = time.time() + 10
    while f32.stats().running and time.time() < deadline:
        time.sleep(0.01)
    assert sorted(f32._free_slots) == list(range(f32.max_batch_size)) and not f32._slots
    assert all(_slot_empty(f32, s) for s in range(f32.max_batch_size))


def test_seeded_sampling_repeats_and_stop_strings_cut(f32):
    ids = f32.encode("Once upon a time")
    p = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=7)
    assert f32.generate(ids, p).token_ids == f32.generate(ids, p).token_ids
    r = f32.generate(ids, SamplingParams(max_tokens=60, temperature=0, stop=("Lily",)))
    assert r.finish_reason == "stop" and r.text == ", there was a little girl named "


def test_q8_0_runs_quietly_and_its_gguf_is_cached(stories260k, reference, gguf_cache, capfd):
    capfd.readouterr()
    eng = create_engine(stories260k, engine="llamacpp", quantize="int8", cache_dir=gguf_cache)  # int8: an alias of q8_0
    eng.start()
    try:
        r = eng.generate(eng.encode("Once upon a time"), GREEDY)
        assert r.completion_tokens == GREEDY.max_tokens and "Lily" in r.text
        assert r.token_ids[:Q8_AGREE_PREFIX] == reference["Once upon a time"][:Q8_AGREE_PREFIX]
        assert eng.quantize == "q8_0" and "-q8_0-" in eng.gguf_path.name and eng.gguf_path.parent == gguf_cache
    finally:
        eng.close()
    err = capfd.readouterr().err
    assert "llama" not in err and "ggml" not in err  # llama.cpp's log goes to our logger, not stderr
    again = create_engine(stories260k, engine="llamacpp", quantize="q8_0", cache_dir=gguf_cache)
    try:
        assert again.gguf_path == eng.gguf_path  # keyed by the folder's content and the type: reused
        assert sorted(p.suffix for p in gguf_cache.iterdir() if not p.name.startswith(".")) == [".gguf", ".gguf"]
    finally:
        again.close()


def test_options_and_models_it_refuses(stories260k, tmp_path):
    with pytest.raises(ConfigError, match="q8_0"):
        create_engine(stories260k, engine="llamacpp", quantize="q3_k")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        create_engine(tmp_path, engine="llamacpp")


def test_auto_picks_llamacpp_for_a_llama(stories260k, gguf_cache):
    eng = create_engine(stories260k, engine="auto", quantize=None, cache_dir=gguf_cache)
    try:
        assert eng.name == "llamacpp" and eng.export_seconds < 5  # the f32 GGUF of the first test is reused
    finally:
        eng.close()
