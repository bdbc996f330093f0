"""The GPTQ int4 stories260k served by `modelpress serve VARIANT_FOLDER` (a real process on 127.0.0.1, the
OpenVINO engine it picks for a decoder folder) answers the real `openai` client: completions and chat,
streamed and not, with the variant's own greedy tokens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from .._gptq import gptq_stories260k
from .._processes import popen_group, wait_ready

pytestmark = [pytest.mark.needs_data, pytest.mark.slow]  # stories260k and TinyStories (GPTQ calibration); a server process
openai = pytest.importorskip("openai")
pytest.importorskip("nncf")

START_TIMEOUT_S = 120  # a fresh interpreter imports torch and OpenVINO, then compiles the decoder
EXIT_TIMEOUT_S = 30
REQUEST_TIMEOUT_S = 30
PROMPT = "Once upon a time"
MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about a cat."}]
MAX_TOKENS = 24


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, stories260k, data_dir):
    """(openai client, model name, variant folder) of `modelpress serve` on the GPTQ variant; SIGTERM at the end must exit 0."""
    folder = gptq_stories260k(tmp_path_factory, stories260k, data_dir)
    port, home = _free_port(), tmp_path_factory.mktemp("serve-home")
    url, log_path = f"http://127.0.0.1:{port}", home / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MODELPRESS_HOME": str(home)}
    cmd = [sys.executable, "-c", "from modelpress.cli import main; main()", "serve", str(folder)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--max-batch-size", "4", "--log-level", "error"]
    with open(log_path, "ab") as log:
        proc = popen_group(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    client = None
    try:
        wait_ready(f"{url}/v2/health/ready", proc, START_TIMEOUT_S, log=log_path)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
        (model,) = [m.id for m in client.models.list().data]
        yield client, model, folder
    finally:
        if client is not None:
            client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(EXIT_TIMEOUT_S)
        finally:
            proc.end_group()
    assert proc.returncode == 0, log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def variant_greedy(served):
    """The variant's greedy continuation of PROMPT by the OpenVINO engine in this process (f32, as it is served)."""
    from modelpress.generation import SamplingParams, create_engine

    engine = create_engine(served[2], "openvino", precision="f32")
    engine.start()
    try:
        out = engine.generate(engine.encode(PROMPT), SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=()))
    finally:
        engine.stop()
    assert engine.quantize == "int4-gptq"
    return out


def test_completions_streamed_and_not_are_the_variants_greedy_tokens(served, variant_greedy):
    client, model, _ = served
    answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    choice = answer.choices[0]
    assert choice.text == variant_greedy.text and choice.finish_reason == variant_greedy.finish_reason == "length"
    assert answer.usage.completion_tokens == len(variant_greedy.token_ids) == MAX_TOKENS
    assert answer.usage.prompt_tokens == variant_greedy.prompt_tokens

    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True))
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(pieces) > 3  # token by token, not in one piece
    assert "".join(pieces) == variant_greedy.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_chat_streamed_and_not_tells_the_same_seeded_story(served):
    client, model, _ = served
    args = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": 3}
    stream = client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and 0 < usage.completion_tokens <= MAX_TOKENS

    again = client.chat.completions.create(**args)
    message = again.choices[0].message
    assert message.role == "assistant" and message.content == "".join(pieces)
    assert again.usage.completion_tokens == usage.completion_tokens and again.usage.prompt_tokens == usage.prompt_tokens
    assert again.choices[0].finish_reason in ("length", "stop")
