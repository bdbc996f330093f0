"""A Gradio chat over a modelpress server's OpenAI endpoint: ``modelpress chat --url http://127.0.0.1:8000``.

The page is an HTTP client of ``POST /v1/chat/completions`` (``stream: true``) and
``GET /v1/models``, so it runs anywhere the server is reachable and imports nothing of the
server. It shows a model picker (the served causal LMs), a system prompt, the temperature and
the maximum number of new tokens; the reply streams in token by token, and the stop button
ends the stream (closing the connection, which cancels the sequence on the server).

    from modelpress.chat import ChatClient, build_app
    client = ChatClient("http://127.0.0.1:8000")
    print("".join(client.stream("stories260k", [{"role": "user", "content": "Tell me a story."}])))
    build_app("http://127.0.0.1:8000").launch()

Needs the ``chat`` extra (``pip install 'modelpress[chat]'``: Gradio).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from modelpress.errors import ConfigError, ModelpressRuntimeError

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_SLIDER = 4096  # the slider's top; the server still bounds prompt + max_tokens by the model's context
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 300.0  # between two streamed chunks (a long prompt's prefill on a busy CPU)
LLM_TASK = "causal-lm"
SERVE_HINT = "Start one with: modelpress serve ../shared/data/models/stories260k (then pass its address with --url)."


class ChatClient:
    """The few calls the chat page makes to a modelpress (or any OpenAI-compatible) server."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None) -> None:
        import httpx

        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"The server URL '{url}' is not an http(s) address.", hint=f"Example: --url {DEFAULT_URL}")
        self.url = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        self._headers = headers

    def _client(self) -> Any:
        import httpx

        return httpx.Client(base_url=self.url, headers=self._headers, timeout=self._timeout)

    def _fail(self, response: Any) -> ModelpressRuntimeError:
        try:
            error = json.loads(response.read())["error"]
            message = error["message"] if isinstance(error, dict) else str(error)
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code}"
        hint = "Pass the server's key with --api-key (or MODELPRESS_API_KEY)." if response.status_code == 401 else SERVE_HINT
        return ModelpressRuntimeError(f"The server at {self.url} answered {response.status_code}: {message}", hint=hint)

    def models(self) -> list[str]:
        """The served causal LMs (a server that does not say a model's task: every model it lists)."""
        import httpx

        try:
            with self._client() as http:
                response = http.get("/v1/models")
        except httpx.HTTPError as exc:
            raise ModelpressRuntimeError(f"Cannot reach the server at {self.url}: {exc}.", hint=SERVE_HINT) from None
        if response.status_code != 200:
            raise self._fail(response)
        return [m["id"] for m in response.json().get("data", []) if m.get("task", LLM_TASK) == LLM_TASK]

    def stream(
        self,
        model: str,
        messages: Sequence[dict[str, str]],
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
    ) -> Iterator[str]:
        """The reply's text, piece by piece as the server streams it. Closing the iterator closes the connection."""
        import httpx

        body: dict[str, Any] = {"model": model, "messages": list(messages), "temperature": temperature, "stream": True}
        if max_tokens:
            body["max_tokens"] = int(max_tokens)
        try:
            with self._client() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise self._fail(response)
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ModelpressRuntimeError(f"The server stopped the reply: {chunk['error'].get('message')}", hint=SERVE_HINT)
                    for choice in chunk.get("choices", []):
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
        except httpx.HTTPError as exc:
            raise ModelpressRuntimeError(f"Lost the server at {self.url}: {exc}.", hint=SERVE_HINT) from None


def _text(content: Any) -> str:
    """The text of a Gradio history message's content (a string, text parts, or a file: no text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", "")) if content.get("type", "text") == "text" else ""
    if isinstance(content, list | tuple):
        return "".join(_text(part) for part in content)
    return ""


def conversation(message: str, history: Sequence[dict[str, Any]], system: str = "") -> list[dict[str, str]]:
    """The OpenAI messages for a new user ``message`` after ``history`` (Gradio's role/content dicts)."""
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for turn in history:
        role = turn.get("role")
        text = _text(turn.get("content"))
        if role in ("user", "assistant") and text:
            messages.append({"role": role, "content": text})
    messages.append({"role": "user", "content": message})
    return messages


def _on_a_running_loop(build: Any) -> Any:
    """``build()`` with an event loop running: Gradio's Blocks, made outside one, each make and keep a new loop that is
    never closed (gradio.utils.safe_get_stop_event), leaking its sockets. Its asyncio objects bind to a loop on first use."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:

        async def run() -> Any:
            return build()

        return asyncio.run(run())
    return build()


def build_app(
    url: str = DEFAULT_URL,
    api_key: str | None = None,
    *,
    model: str | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Any:
    """The Gradio Blocks of the chat page (not launched). ``model``: the one picked at first (default: the first served);
    ``temperature`` and ``max_tokens``: the sliders' first values."""
    from modelpress.errors import require

    gr = require("gradio", "chat")
    client = ChatClient(url, api_key)
    models = client.models()
    if model is not None and model not in models:
        raise ConfigError(
            f"The server at {client.url} serves no causal LM named '{model}'.",
            hint=f"Served causal LMs: {', '.join(models) or 'none'}. Leave --model out to pick the first.",
        )
    if not models:
        raise ConfigError(f"The server at {client.url} serves no causal LM to chat with.", hint=SERVE_HINT)

    return _on_a_running_loop(lambda: _blocks(gr, client, models, model, temperature, max_tokens))


def _blocks(gr: Any, client: ChatClient, models: list[str], model: str | None, temperature: float, max_tokens: int) -> Any:
    def respond(message: str, history: list[dict[str, Any]], model: str, system: str, temperature: float, max_tokens: float) -> Any:
        if not model:
            raise gr.Error("Pick a model first.")
        reply = ""
        try:
            for piece in client.stream(model, conversation(message, history, system), temperature=temperature, max_tokens=int(max_tokens)):
                reply += piece
                yield reply
        except ModelpressRuntimeError as exc:
            raise gr.Error(exc.message) from None

    def refresh() -> Any:
        try:
            names = client.models()
        except ModelpressRuntimeError as exc:
            raise gr.Error(exc.message) from None
        return gr.Dropdown(choices=names, value=names[0] if names else None)

    with gr.Blocks(title="modelpress chat", analytics_enabled=False) as app:
        gr.Markdown(f"### modelpress chat · {client.url}")
        with gr.Row():
            picker = gr.Dropdown(choices=models, value=model or models[0], label="Model", scale=4, elem_id="model")
            reload = gr.Button("Refresh models", scale=1)
        system = gr.Textbox(label="System prompt", placeholder="You are a helpful assistant.", lines=2, elem_id="system")
        with gr.Row():
            temperature_slider = gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="Temperature (0: greedy)")
            max_tokens_slider = gr.Slider(1, MAX_TOKENS_SLIDER, value=max_tokens, step=1, label="Max new tokens")
        gr.ChatInterface(
            respond,
            additional_inputs=[picker, system, temperature_slider, max_tokens_slider],
            chatbot=gr.Chatbot(elem_id="chatbot", height=420),
            textbox=gr.Textbox(placeholder="Type a message and press Enter", elem_id="message", scale=7),
            stop_btn=True,
            analytics_enabled=False,
        )
        reload.click(refresh, outputs=picker)
    return app


def launch(
    url: str = DEFAULT_URL,
    api_key: str | None = None,
    *,
    model: str | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    host: str = "127.0.0.1",
    port: int | None = None,
    open_browser: bool = False,
    block: bool = True,
) -> Any:
    """Build the chat page and serve it (until Ctrl-C when ``block``); returns the Gradio app (``.local_url``, ``.close()``)."""
    from modelpress.errors import require

    gr = require("gradio", "chat")
    app = build_app(url, api_key, model=model, temperature=temperature, max_tokens=max_tokens)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline

    def start() -> None:
        app.queue(default_concurrency_limit=8)
        app.launch(
            server_name=host,
            server_port=port,
            inbrowser=open_browser,
            prevent_thread_lock=True,  # the server runs in Gradio's thread; block_thread() below waits for Ctrl-C
            quiet=not block,
            show_error=True,
            theme=theme,
        )

    _on_a_running_loop(start)
    if block:
        app.block_thread()  # until Ctrl-C, then closes the page's server
    return app


__all__ = ["ChatClient", "build_app", "conversation", "launch"]
