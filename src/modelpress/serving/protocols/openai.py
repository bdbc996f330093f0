"""OpenAI-compatible ``GET /v1/models``, ``GET /v1/models/{id}`` and ``POST /v1/embeddings``.

``input`` is a string, a list of strings, a list of token ids or a list of token-id lists;
``encoding_format`` is ``float`` or ``base64`` (little-endian float32, what the official
client asks for by default). ``usage`` counts the tokens the model read (special tokens
included, after truncation to the model's length). Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``. Completions and chat of the served causal LMs:
:mod:`modelpress.serving.protocols.openai_llm`.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from modelpress.errors import InvalidInputError, ModelpressError
from modelpress.serving.handlers import MAX_INPUTS_PER_REQUEST
from modelpress.serving.http import dumps, error_response, info_of, json_response, loads, openapi_body
from modelpress.serving.protocols.tensors import validation_summary

router = APIRouter(tags=["OpenAI"])
EXAMPLE = '{"model": "minilm", "input": ["A man is playing a guitar.", "A dog runs."], "encoding_format": "float"}'


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings`` (OpenAI's body; unknown fields are ignored, as OpenAI-compatible servers do)."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "example": {"model": "minilm", "input": ["A man is playing a guitar.", "A dog runs."], "encoding_format": "float"}
        },
    )
    model: str = Field(min_length=1, max_length=256, description="The name of a served embedding model")
    input: str | list[str] | list[int] | list[list[int]] = Field(description="Text(s), token ids, or lists of token ids")
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)


_embeddings_doc = openapi_body(EmbeddingsRequest)


def _fail(exc: ModelpressError) -> Response:
    """The openai error answer of a modelpress error (anything else reaches the app's handlers)."""
    return error_response(exc, "openai")


def _model_object(lv: Any) -> dict[str, Any]:
    obj = {"id": lv.name, "object": "model", "created": int(lv.loaded_at), "owned_by": "modelpress", "task": lv.task}
    context = getattr(getattr(lv.handler, "engine", None), "context_length", None)
    if context:  # a causal LM (vLLM names it so): what prompt plus max_tokens may hold
        obj["max_model_len"] = context
    return obj


@router.get("/v1/models", summary="Served models")
async def list_models(request: Request) -> Response:
    server = request.app.state.server
    try:
        server.check_inference_key(request)
        data = []
        for name in server.repository.names():
            try:
                data.append(_model_object(server.repository.get(name)))
            except ModelpressError:
                continue  # still loading
        return json_response({"object": "list", "data": data})
    except ModelpressError as exc:
        return _fail(exc)


@router.get("/v1/models/{model}", summary="One served model")
async def get_model(request: Request, model: str) -> Response:
    server = request.app.state.server
    try:
        server.check_inference_key(request)
        return json_response(_model_object(server.repository.get(model)))
    except ModelpressError as exc:
        return _fail(exc)


def _inputs(value: Any) -> tuple[str, Any]:
    """("text", texts) or ("ids", token lists) for the ``input`` field."""
    if isinstance(value, str):
        if not value:
            raise InvalidInputError("'input' is an empty string.", hint=f"Example: {EXAMPLE}")
        return "text", [value]
    if not isinstance(value, list) or not value:
        raise InvalidInputError("'input' must be a non-empty string or list.", hint=f"Example: {EXAMPLE}")
    if all(isinstance(v, str) for v in value):
        empty = next((i for i, v in enumerate(value) if not v), None)
        if empty is not None:
            raise InvalidInputError(f"'input[{empty}]' is an empty string.", hint="Leave empty strings out.")
        return "text", value
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "ids", [value]
    if all(isinstance(v, list) for v in value):
        return "ids", value
    raise InvalidInputError(
        "'input' must be a string, a list of strings, a list of token ids, or a list of token-id lists.", hint=f"Example: {EXAMPLE}"
    )


@router.post("/v1/embeddings", summary="Embeddings", openapi_extra=_embeddings_doc)
async def embeddings(request: Request) -> Response:
    server = request.app.state.server
    info = info_of(request)
    try:
        server.check_inference_key(request)
        raw = loads(await request.body(), example=EXAMPLE)
        if not isinstance(raw, dict):
            raise InvalidInputError("The request must be a JSON object.", hint=f"Example: {EXAMPLE}")
        if isinstance(raw.get("input"), list) and len(raw["input"]) > MAX_INPUTS_PER_REQUEST:  # counted before anything loops over them
            raise InvalidInputError(
                f"'input' has {len(raw['input'])} items; at most {MAX_INPUTS_PER_REQUEST} are accepted in one request.",
                hint=f"Split it into requests of at most {MAX_INPUTS_PER_REQUEST} inputs.",
            )
        try:
            doc = EmbeddingsRequest.model_validate(raw)
        except ValidationError as exc:
            raise InvalidInputError(f"Invalid embeddings request: {validation_summary(exc)}.", hint=f"Example: {EXAMPLE}") from None
        model = doc.model
        if model in server.repository.routers:
            info.model = model
        fmt = doc.encoding_format or "float"
        kind, values = _inputs(doc.input)
        dims = doc.dimensions

        def decode(handler: Any) -> Any:
            if handler.task_name != "embedding":
                raise InvalidInputError(f"Model '{model}' is a {handler.task_name} model; /v1/embeddings needs an embedding model.")
            return handler.decode(values) if kind == "text" else handler.decode_ids(values)

        lv, results, decoded = await server.infer(model, None, info, decode, request.headers)
        width = int(results[0].shape[-1])
        if dims is not None and dims != width:
            raise InvalidInputError(
                f"'dimensions' is {dims!r}, but model '{model}' makes {width}-dimensional embeddings.", hint="Leave 'dimensions' out."
            )
        data = []
        for i, emb in enumerate(results):
            vec = np.ascontiguousarray(emb, dtype="<f4")
            data.append(
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": base64.b64encode(vec.tobytes()).decode("ascii") if fmt == "base64" else vec,
                }
            )
        usage = {"prompt_tokens": decoded.tokens, "total_tokens": decoded.tokens}
        return Response(dumps({"object": "list", "data": data, "model": lv.name, "usage": usage}), media_type="application/json")
    except ModelpressError as exc:
        return _fail(exc)
