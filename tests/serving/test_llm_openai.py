"""A causal LM served by `modelpress serve`: OpenAI completions and chat through the real `openai` client,
streaming and not, against stories260k on 127.0.0.1; errors, 429, cancellation on disconnect, metrics.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from .conftest import LLM_MAX_BATCH, LLM_MAX_WAITING, wait_until

pytestmark = pytest.mark.needs_data
openai = pytest.importorskip("openai")

MODEL = "stories260k"
PROMPT = "Once upon a time"
GREEDY_START = ", there was a little girl named Lily"  # what stories260k writes greedily after PROMPT
LONG = 400  # tokens: far longer than any step of these tests waits (about 1 ms a token here), ended by cancel
CANCEL_TIMEOUT_S = 10  # a cancelled sequence leaves the batch at the engine's next step: well within this


_clients: dict[str, openai.OpenAI] = {}


def client(url: str) -> openai.OpenAI:
    """The real OpenAI client on the test server (one per server, closed at the end of the module)."""
    if url not in _clients:
        _clients[url] = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    return _clients[url]


@pytest.fixture(autouse=True, scope="module")
def _close_clients():
    yield
    while _clients:
        _clients.popitem()[1].close()


def engine_of(server):
    return server.repository.get(MODEL).handler.engine


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in a /metrics page (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_openai_client_streams_a_chat(llm_server):
    server, url = llm_server
    stream = client(url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about a cat."}],
        max_tokens=24,
        temperature=0.8,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3  # streamed token by token, not in one piece
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    prompt_ids = engine_of(server).apply_chat_template(
        [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about a cat."}]
    )
    assert usage.prompt_tokens == len(prompt_ids)
    assert 0 < usage.completion_tokens <= 24 and (finishes == ["stop"] or usage.completion_tokens == 24)
    # the same seed gives the same story, streamed or not
    again = client(url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about a cat."}],
        max_tokens=24,
        temperature=0.8,
        seed=3,
    )
    assert again.choices[0].message.content == "".join(pieces)
    assert again.choices[0].message.role == "assistant" and again.usage.completion_tokens == usage.completion_tokens


def test_greedy_completion_matches_the_reference_engine(llm_server, stories260k):
    from modelpress.generation import SamplingParams, create_engine

    _, url = llm_server
    answer = client(url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0)
    reference = create_engine(str(stories260k), engine="torch", max_batch_size=1)
    reference.start()
    try:
        ref = reference.generate(reference.encode(PROMPT), SamplingParams(max_tokens=32, temperature=0.0))
        served_ids = reference.encode(PROMPT + answer.choices[0].text)[len(reference.encode(PROMPT)) :]
    finally:
        reference.stop()
    assert answer.choices[0].text.startswith(GREEDY_START)
    assert answer.choices[0].text == ref.text
    assert answer.usage.completion_tokens == len(ref.token_ids) == 32
    assert served_ids == ref.token_ids  # token for token (the text re-encodes to the same ids)
    assert answer.choices[0].finish_reason == ref.finish_reason == "length"
    assert answer.usage.prompt_tokens == len(reference.encode(PROMPT)) == ref.prompt_tokens


def test_completions_n_seed_stop_and_lists(llm_server):
    _, url = llm_server
    c = client(url)
    first = c.completions.create(model=MODEL, prompt=PROMPT, n=2, seed=7, temperature=1.0, max_tokens=12)
    again = c.completions.create(model=MODEL, prompt=PROMPT, n=2, seed=7, temperature=1.0, max_tokens=12)
    texts = [ch.text for ch in sorted(first.choices, key=lambda ch: ch.index)]
    assert [ch.index for ch in sorted(first.choices, key=lambda ch: ch.index)] == [0, 1]
    assert texts == [ch.text for ch in sorted(again.choices, key=lambda ch: ch.index)]  # seeded: reproducible
    assert texts[0] != texts[1]  # choice i samples with seed + i
    assert first.usage.prompt_tokens == 5 and first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens

    stopped = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, stop=["Lily"])
    assert stopped.choices[0].text == ", there was a little girl named "
    assert stopped.choices[0].finish_reason == "stop"

    two = c.completions.create(model=MODEL, prompt=[PROMPT, "The dog"], max_tokens=4, temperature=0)
    assert len(two.choices) == 2 and two.choices[0].text.startswith(", there")
    assert all(ch.finish_reason == "length" for ch in two.choices) and two.usage.completion_tokens == 8

    streamed = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    chunks = list(streamed)
    whole = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_errors_in_openai_shape(llm_server):
    _, url = llm_server
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="no-such-model", prompt=PROMPT)
    cases = [
        ({"model": MODEL}, 400, "prompt"),
        ({"model": MODEL, "prompt": PROMPT, "max_tokens": 100_000}, 400, "context"),
        ({"model": MODEL, "prompt": PROMPT, "n": 0}, 400, "'n'"),
        ({"model": MODEL, "prompt": PROMPT, "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "prompt": PROMPT, "tools": []}, 400, "tools"),
        ({"model": MODEL, "prompt": PROMPT, "presence_penalty": 1.0}, 400, "presence_penalty"),
        ({"model": MODEL, "prompt": [70000]}, 400, "vocabulary"),
        ({"model": MODEL, "prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400, "prompt"),
    ]
    with httpx.Client(base_url=url, timeout=30) as http:
        for body, status, word in cases:
            r = http.post("/v1/completions", json=body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", body
            assert word in err["message"], (word, err["message"])
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "tool", "content": "x"}]})
        assert r.status_code == 400 and "role" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert r.status_code == 400
        r = http.post("/v2/models/stories260k/infer", json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]})
        assert r.status_code == 400 and "/v1/completions" in r.json()["error"]


def test_a_full_queue_answers_429(llm_server):
    from modelpress.generation import SamplingParams

    server, url = llm_server
    engine = engine_of(server)
    long = SamplingParams(max_tokens=LONG, temperature=0.0, stop_token_ids=())
    prompt = engine.encode(PROMPT)
    handles = [engine.submit(prompt, long) for _ in range(LLM_MAX_BATCH)]
    try:
        wait_until(lambda: engine.stats().running == LLM_MAX_BATCH, CANCEL_TIMEOUT_S, "a full batch")
        handles += [engine.submit(prompt, long) for _ in range(LLM_MAX_WAITING)]
        with pytest.raises(openai.RateLimitError) as caught:
            client(url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
        assert caught.value.response.headers["retry-after"].isdigit()
        assert caught.value.body["type"] == "rate_limit_error"
    finally:
        for h in handles:
            h.cancel()
    wait_until(lambda: engine.stats().running + engine.stats().waiting == 0, CANCEL_TIMEOUT_S, "the cancelled sequences to leave")
    assert client(url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def _cancelled(url: str) -> float:
    return metric(httpx.get(f"{url}/metrics").text, "modelpress_llm_sequences_total", model=MODEL, finish_reason="cancelled")


def test_a_client_that_disconnects_cancels_its_sequence(llm_server):
    server, url = llm_server
    engine = engine_of(server)
    before = _cancelled(url)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert next(line for line in r.iter_lines() if line.startswith("data: "))
        assert engine.stats().running == 1
    # leaving the block closed the connection mid-stream
    wait_until(lambda: engine.stats().running == 0, CANCEL_TIMEOUT_S, "the streamed sequence to be cancelled")
    assert engine.stats().generated_tokens > 0
    assert _cancelled(url) == before + 1

    # not streamed: the client gives up waiting (a read timeout closes the connection)
    body["stream"] = False
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=0.3)) as http:
        http.post("/v1/completions", json=body)
    wait_until(lambda: engine.stats().running == 0, CANCEL_TIMEOUT_S, "the sequence to be cancelled")
    assert _cancelled(url) == before + 2, f"not cancelled (waited {time.monotonic() - started:.2f} s)"


def test_two_streams_share_decode_steps(llm_server):
    server, url = llm_server
    engine = engine_of(server)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=url, timeout=30) as a,
        httpx.Client(base_url=url, timeout=30) as b,
        a.stream("POST", "/v1/completions", json=body, headers={"x-request-id": "share-a"}) as ra,
    ):
        a_lines = ra.iter_lines()
        assert next(line for line in a_lines if line.startswith("data: "))  # stream a has begun
        with b.stream("POST", "/v1/completions", json=body, headers={"x-request-id": "share-b"}) as rb:
            b_data = [line for line in rb.iter_lines() if line.startswith("data: ")]
        a_data = [line for line in a_lines if line.startswith("data: ")]
    assert a_data[-1] == b_data[-1] == "data: [DONE]"
    shared = [step for step in engine.stats().step_log if "share-a-0" in step and "share-b-0" in step]
    assert shared, "the two overlapping streams never shared a decode step"


def test_listing_metrics_health_and_dashboard(llm_server):
    _, url = llm_server
    with httpx.Client(base_url=url, timeout=30) as http:
        client(url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
        models = {m.id: m for m in client(url).models.list().data}
        assert models[MODEL].task == "causal-lm" and models[MODEL].max_model_len == 512
        listed = {v["name"]: v for v in http.get("/v2/models").json()}
        assert listed[MODEL]["task"] == "causal-lm" and listed[MODEL]["runtime"] == "torch"
        assert http.get("/v2/health/ready").status_code == 200
        assert http.get(f"/v2/models/{MODEL}/ready").json()["ready"] is True
        page = http.get("/metrics").text
        for name in ("modelpress_llm_time_to_first_token_seconds_count", "modelpress_llm_inter_token_latency_seconds_count"):
            assert metric(page, name, model=MODEL) > 0, name
        assert metric(page, "modelpress_llm_generated_tokens_total", model=MODEL) >= 8
        assert metric(page, "modelpress_llm_sequences_total", model=MODEL, finish_reason="length") >= 1
        assert re.search(r'modelpress_llm_running_sequences\{model="stories260k",version="1"\} 0\.0', page)
        assert re.search(r'modelpress_llm_kv_cache_capacity_tokens\{model="stories260k",version="1"\} [1-9]', page)
        assert 'modelpress_llm_kv_cache_usage{model="stories260k",version="1"}' in page
        data = http.get("/dashboard/data").json()
        llm = next(m for m in data["models"] if m["name"] == MODEL)["versions"][0]["llm"]
        assert llm["engine"] == "torch" and llm["running"] == 0 and llm["generated_tokens"] >= 8
        assert llm["tokens_per_s"] > 0 and llm["ttft_p50_ms"] > 0 and llm["itl_p50_ms"] > 0
