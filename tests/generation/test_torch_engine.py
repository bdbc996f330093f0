"""The reference engine on the real stories260k: greedy output, the no-cache reference loop,
continuous batching (a sequence alone equals the same sequence in a changing batch; overlapping
requests share decode steps), the full queue, seeds, stop strings, cancel and async streaming."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from modelpress.errors import InvalidInputError, ServerOverloadedError
from modelpress.generation import SamplingParams, create_engine

GREEDY = SamplingParams(max_tokens=40, temperature=0, stop_token_ids=())
PROMPTS = ["Once upon a time", "The cat sat", "Lily and Tom went to the", "One day, a big dog"]
STEP_TIMEOUT_S = 60.0  # a generous bound on any one request on a loaded 2-core machine


@pytest.fixture(scope="module")
def engine(stories260k):
    eng = create_engine(stories260k, engine="torch", max_batch_size=4, max_waiting=8)
    eng.start()
    yield eng
    eng.stop(drain=False)


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Argmax of a full forward pass over the whole text at every step: no cache, no batching."""
    x = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            x.append(int(model(input_ids=torch.tensor([x]), use_cache=False).logits[0, -1].argmax()))
    return x[len(ids) :]


def test_greedy_story_begins_with_lily(engine):
    r = engine.generate(engine.encode("Once upon a time"), SamplingParams(max_tokens=12, temperature=0))
    assert ("Once upon a time" + r.text).startswith("Once upon a time, there was a little girl named Lily")
    assert r.finish_reason == "length" and r.completion_tokens == 12 and r.prompt_tokens == 5


def test_greedy_equals_full_recompute_reference(engine):
    for prompt in PROMPTS[:2]:
        ids = engine.encode(prompt)
        r = engine.generate(ids, GREEDY)
        assert r.token_ids == reference_greedy(engine.model, ids, GREEDY.max_tokens)
        assert r.text == engine.decode(ids + r.token_ids)[len(engine.decode(ids)) :]


def test_streamed_text_is_the_result_text(engine):
    h = engine.submit(engine.encode("Once upon a time"), SamplingParams(max_tokens=30, temperature=0))
    events = list(h)
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
    assert "".join(e.text for e in events) == h.result(STEP_TIMEOUT_S).text
    assert "\ufffd" not in h.result().text


def test_continuous_batching_matches_alone_and_shares_steps(engine):
    alone = {p: engine.generate(engine.encode(p), GREEDY).token_ids for p in PROMPTS}
    # Staggered arrivals: requests join the running batch between decode steps, and short ones
    # leave it early while the others continue.
    handles = []
    for i, p in enumerate(PROMPTS):
        params = SamplingParams(max_tokens=40 - 8 * i, temperature=0, stop_token_ids=())
        handles.append((p, params, engine.submit(engine.encode(p), params)))
        time.sleep(0.01)
    for p, params, h in handles:
        assert h.result(STEP_TIMEOUT_S).token_ids == alone[p][: params.max_tokens]
    ids = {h.request_id for _, _, h in handles}
    shared = [step for step in engine.stats().step_log if len(ids.intersection(step)) >= 2]
    assert shared, "overlapping requests never shared a decode step"


def test_prompts_admitted_together_are_prefilled_together_and_match_alone(engine):
    alone = {p: engine.generate(engine.encode(p), GREEDY).token_ids for p in PROMPTS}
    shapes = []
    original = engine._prefill_padded
    engine._prefill_padded = lambda ids, *rest: (shapes.append(tuple(ids.shape)), original(ids, *rest))[1]
    try:
        with engine._lock:  # the step loop waits: all four are admitted at its next step
            handles = [engine.submit(engine.encode(p), GREEDY) for p in PROMPTS]
        assert [h.result(STEP_TIMEOUT_S).token_ids for h in handles] == [alone[p] for p in PROMPTS]
    finally:
        del engine._prefill_padded
    assert shapes == [(4, max(len(engine.encode(p)) for p in PROMPTS))]  # one left-padded prefill


def test_full_queue_is_overloaded(stories260k):
    eng = create_engine(stories260k, max_batch_size=1, max_waiting=2)
    eng.start()
    try:
        ids = eng.encode("Once upon a time")
        long = SamplingParams(max_tokens=400, temperature=0, stop_token_ids=())
        handles = [eng.submit(ids, long)]
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while eng.stats().running < 1 and time.monotonic() < deadline:  # the first one runs, the queue is empty
            time.sleep(0.005)
        handles += [eng.submit(ids, long), eng.submit(ids, long)]
        with pytest.raises(ServerOverloadedError, match="queue is full"):
            eng.submit(ids, long)
        for h in handles:
            h.cancel()
        assert [h.result(STEP_TIMEOUT_S).finish_reason for h in handles] == ["cancelled"] * 3
    finally:
        eng.stop(drain=False)


def test_no_waiting_room_still_fills_free_slots(stories260k):
    eng = create_engine(stories260k, max_batch_size=2, max_waiting=0)
    eng.start()
    try:
        ids = eng.encode("Once upon a time")
        long = SamplingParams(max_tokens=400, temperature=0, stop_token_ids=())
        with eng._lock:  # both are submitted before the loop admits either: they take the two free slots
            handles = [eng.submit(ids, long), eng.submit(ids, long)]
            with pytest.raises(ServerOverloadedError):
                eng.submit(ids, long)
        for h in handles:
            h.cancel()
            assert h.result(STEP_TIMEOUT_S).finish_reason == "cancelled"
    finally:
        eng.stop(drain=False)


def test_prompt_plus_max_tokens_must_fit_the_context(engine):
    with pytest.raises(InvalidInputError, match="exceeds the model's context of 512") as info:
        engine.submit(engine.encode("Once upon a time"), SamplingParams(max_tokens=510))
    assert "lower max_tokens to at most 507" in str(info.value)
    with pytest.raises(InvalidInputError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(InvalidInputError, match="non-empty strings"):
        engine.submit(engine.encode("Once"), SamplingParams(stop=("",)))
    with pytest.raises(InvalidInputError, match="temperature >= 0"):
        engine.submit(engine.encode("Once"), SamplingParams(temperature=-1))


def test_seed_reproduces_sampling(engine):
    ids = engine.encode("Once upon a time")
    params = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, top_k=40, seed=7, stop_token_ids=())
    a, b = engine.generate(ids, params), engine.generate(ids, params)
    c = engine.generate(ids, SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, top_k=40, seed=8, stop_token_ids=()))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_string_cuts_the_text_and_is_never_streamed(engine):
    ids = engine.encode("Once upon a time")
    full = engine.generate(ids, SamplingParams(max_tokens=30, temperature=0)).text
    assert "little girl" in full
    h = engine.submit(ids, SamplingParams(max_tokens=30, temperature=0, stop=("little girl",)))
    events = list(h)
    assert events[-1].finish_reason == "stop"
    assert h.result().text == full[: full.index("little girl")]
    assert "".join(e.text for e in events) == h.result().text
    assert not any("little" in e.text for e in events)


def test_stop_ids_end_a_story(engine):
    r = engine.generate(engine.encode("Once upon a time"), SamplingParams(max_tokens=400, temperature=0))
    assert r.finish_reason == "stop" and 1 not in r.token_ids and 2 not in r.token_ids
    assert r.completion_tokens == len(r.token_ids) + 1  # the stop id counts, it is not in the text


def test_cancel_frees_the_slot(engine):
    h = engine.submit(engine.encode("Once upon a time"), SamplingParams(max_tokens=400, temperature=0, stop_token_ids=()))
    next(iter(h))  # running
    h.cancel()
    r = h.result(STEP_TIMEOUT_S)
    assert r.finish_reason == "cancelled" and len(r.token_ids) < 400
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.stats().running == 0


def test_async_streaming_from_an_event_loop(engine):
    ids = engine.encode("Once upon a time")
    expected = engine.generate(ids, SamplingParams(max_tokens=20, temperature=0)).text
    seen_threads: set[int] = set()

    async def consume() -> str:
        handle = engine.submit(ids, SamplingParams(max_tokens=20, temperature=0))
        parts = []
        async for event in handle.aiter():
            seen_threads.add(threading.get_ident())
            parts.append(event.text)
        return "".join(parts)

    assert asyncio.run(consume()) == expected
    assert len(seen_threads) == 1


def test_observers_get_ttft_itl_and_tokens(engine):
    seen: dict[str, list[float]] = {}
    engine.add_observer(lambda name, value: seen.setdefault(name, []).append(value))
    engine.generate(engine.encode("Once upon a time"), SamplingParams(max_tokens=5, temperature=0, stop_token_ids=()))
    assert len(seen["ttft_s"]) >= 1 and len(seen["itl_s"]) >= 4 and sum(seen["tokens"]) >= 4
    assert all(v >= 0 for v in seen["ttft_s"] + seen["itl_s"])
