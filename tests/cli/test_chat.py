"""`modelpress chat` on the command line: registered, and a server that is not there fails with a clear message."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from modelpress.cli.main import app

runner = CliRunner()


def test_chat_is_a_verb_with_its_options():
    result = runner.invoke(app, ["chat", "--help"])
    assert result.exit_code == 0
    for option in ("--url", "--api-key", "--model", "--temperature", "--max-tokens", "--port"):
        assert option in result.output


def test_chat_without_a_server_says_how_to_start_one():
    pytest.importorskip("gradio")
    result = runner.invoke(app, ["chat", "--url", "http://127.0.0.1:9"])  # port 9 (discard): nothing listens
    assert result.exit_code != 0
    assert "Cannot reach the server at http://127.0.0.1:9" in result.output
    assert "modelpress serve" in result.output


def test_chat_rejects_a_url_that_is_not_http():
    pytest.importorskip("gradio")
    result = runner.invoke(app, ["chat", "--url", "127.0.0.1:8000"])
    assert result.exit_code != 0 and "not an http(s) address" in result.output


def test_conversation_turns_gradio_history_into_openai_messages():
    from modelpress.chat import conversation

    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "user", "content": {"path": "cat.png"}},  # a file: no text, left out
    ]
    assert conversation("Tell me a story.", history, "  Be brief. ") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Tell me a story."},
    ]
    assert conversation("Hi", [], "") == [{"role": "user", "content": "Hi"}]
