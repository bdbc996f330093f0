"""``modelpress chat``: a Gradio chat page streaming from a modelpress server's OpenAI endpoint (:mod:`modelpress.chat`)."""

from __future__ import annotations

from typing import Annotated

import typer


def register_commands(app: typer.Typer) -> None:
    from modelpress.cli.common import handle_errors

    @app.command("chat")
    @handle_errors
    def chat(
        url: Annotated[
            str, typer.Option("--url", "-u", help="The modelpress server (its OpenAI endpoint is URL/v1).")
        ] = "http://127.0.0.1:8000",
        api_key: Annotated[
            str | None,
            typer.Option("--api-key", envvar="MODELPRESS_API_KEY", help="The server's key, when it protects inference (Bearer)."),
        ] = None,
        model: Annotated[str | None, typer.Option("--model", "-m", help="The model picked first (default: the first LLM served).")] = None,
        temperature: Annotated[float, typer.Option("--temperature", help="The temperature slider's first value (0: greedy).")] = 0.7,
        max_tokens: Annotated[int, typer.Option("--max-tokens", help="The max-new-tokens slider's first value.")] = 256,
        host: Annotated[str, typer.Option("--host", help="Address the chat page listens on.")] = "127.0.0.1",
        port: Annotated[int | None, typer.Option("--port", help="Port of the chat page (default: 7860, or the next free one).")] = None,
        open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open the page in a browser.")] = False,
    ) -> None:
        """Chat with a served LLM in the browser: model picker, system prompt, temperature, max tokens, stop button."""
        from modelpress.chat import launch
        from modelpress.errors import require

        require("gradio", "chat")
        launch(url, api_key, model=model, temperature=temperature, max_tokens=max_tokens, host=host, port=port, open_browser=open_browser)
