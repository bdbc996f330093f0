"""The request bodies of the OpenAI-compatible generation routes (:mod:`.openai_llm`), with their limits.

Pydantic models with ``extra`` keys rejected, as OpenAI does; each limit below bounds what one request can make the
server validate, tokenize or generate.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelpress.errors import InvalidInputError

MAX_N = 16  # choices per request (each is a sequence in the engine's batch)
MAX_PROMPTS = 16  # prompts in one completions request
MAX_STOP = 4  # stop strings (OpenAI's limit)
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
MAX_PARTS_PER_MESSAGE = 64  # content parts of one message (clients send one or a few); with MAX_PARTS, bounds validation
MAX_PARTS = 1024  # content parts of all messages of one request together
MAX_PROMPT_IDS = 1 << 17  # token ids in one prompt: the longest context of common open LLMs (131,072); longer fits no model
MAX_TOKENS_LIMIT = 1 << 20  # a bound for the schema; the model's context is the real one (checked by the engine)
MAX_SEED = (1 << 62) - MAX_N  # seed + choice index stays a valid torch seed
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
COMPLETION_EXAMPLE = {"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}
CHAT_EXAMPLE = {
    "model": "stories260k",
    "messages": [{"role": "system", "content": "You tell short stories."}, {"role": "user", "content": "Tell me about a cat."}],
    "max_tokens": 64,
    "stream": True,
}

Stop = str | Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)] | None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(min_length=1, max_length=256, description="A served causal LM (GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, description="Tokens to generate at most.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1 << 20, description="An extension (vLLM's): sample among the k likeliest; 0: off.")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices to generate.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Stop = Field(None, description="Up to 4 strings that end a choice (not included in the text).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Only 0 is supported.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Only an empty map is supported.")
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = Field(False, description="An extension (vLLM's): go on past the model's end-of-sequence ids (fixed lengths).")

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidInputError(
                    f"'{name}' is not supported by this server (got {getattr(self, name)}).", hint=f"Leave '{name}' out."
                )
        if self.logit_bias:
            raise InvalidInputError("'logit_bias' is not supported by this server.", hint="Leave 'logit_bias' out.")

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            if not self.stop:
                raise InvalidInputError("'stop' is an empty string.", hint='Example: "stop": ["\\n\\n", "The end"]')
            return (self.stop,)
        return tuple(self.stop)


class CompletionRequest(Sampling):
    """``POST /v1/completions``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [COMPLETION_EXAMPLE]})
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_IDS)]
        | Annotated[
            list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_IDS)]],
            Field(min_length=1, max_length=MAX_PROMPTS),
        ]
    ) = Field(description="A string, strings, token ids, or lists of token ids.")
    echo: bool = Field(False, description="Only false is supported.")
    logprobs: int | None = Field(None, ge=0, le=5, description="Only null is supported.")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Only null or n is supported.")
    suffix: str | None = Field(None, description="Only null is supported.")

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidInputError("'echo' is not supported by this server.", hint="Leave 'echo' out (the prompt is not repeated).")
        if self.logprobs is not None:
            raise InvalidInputError("'logprobs' is not supported by this server.", hint="Leave 'logprobs' out.")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidInputError(f"'best_of' ({self.best_of}) must equal 'n' ({self.n}) here.", hint="Leave 'best_of' out.")
        if self.suffix:
            raise InvalidInputError("'suffix' (insertion) is not supported by this server.", hint="Leave 'suffix' out.")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_PARTS_PER_MESSAGE)] | None = None
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(Sampling):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [CHAT_EXAMPLE]})
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, description="The newer name of max_tokens.")
    logprobs: bool = Field(False, description="Only false is supported.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Only null is supported.")

    @model_validator(mode="before")
    @classmethod
    def _count_parts(cls, data: Any) -> Any:
        """At most MAX_PARTS content parts in all messages, counted on the raw JSON before each part is validated."""
        messages = data.get("messages") if isinstance(data, dict) else None
        if isinstance(messages, list):
            parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
            if parts > MAX_PARTS:
                raise ValueError(
                    f"the messages have {parts:,} content parts together; at most {MAX_PARTS:,} are accepted in one request "
                    "(join the text parts of each message into one string)"
                )
        return data

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise InvalidInputError("'logprobs' is not supported by this server.", hint="Leave 'logprobs' and 'top_logprobs' out.")
