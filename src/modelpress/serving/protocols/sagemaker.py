"""SageMaker's container contract: ``GET /ping`` and ``POST /invocations``, so the same image runs there.

``/invocations`` takes JSON (``{"inputs": ...}`` or the inputs themselves: a string, a list of
strings, or nested pixel lists for an image model), validated by :class:`InvocationsBody`
(the schema OpenAPI shows). Other content types answer 415 (``text/plain`` is what a web page
can send cross-site without asking; see docs/security.md). With several
models served, the header ``X-Amzn-SageMaker-Target-Model`` names one (else the only one).
Embedding models answer ``{"embeddings": [[...], ...]}``; classifiers ``{"predictions": [...]}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError
from starlette.responses import Response

from modelpress.errors import InvalidInputError, ModelpressError
from modelpress.serving.http import dumps, error_response, info_of, json_response, loads, openapi_body
from modelpress.serving.protocols.tensors import validation_summary

Inputs = str | list[Any]  # a text, texts, or nested pixel lists


class InvocationsObject(BaseModel):
    model_config = ConfigDict(extra="ignore")
    inputs: Inputs = Field(description="A text, a list of texts, or images as nested lists of numbers")


class InvocationsBody(RootModel[InvocationsObject | Inputs]):
    """``{"inputs": ...}``, or the inputs themselves."""


router = APIRouter(tags=["SageMaker"])
EXAMPLE = '{"inputs": ["A man is playing a guitar."]}'
TARGET_HEADER = "x-amzn-sagemaker-target-model"


def _fail(exc: ModelpressError) -> Response:
    """The sagemaker error answer of a modelpress error (anything else reaches the app's handlers)."""
    return error_response(exc, "sagemaker")


@router.get("/ping", summary="SageMaker health check")
async def ping(request: Request) -> Response:
    ok = request.app.state.server.ready
    return json_response({"status": "healthy" if ok else "unavailable"}, 200 if ok else 503)


@router.post(
    "/invocations",
    summary="SageMaker inference",
    openapi_extra=openapi_body(InvocationsBody),
)
async def invocations(request: Request) -> Response:
    server = request.app.state.server
    info = info_of(request)
    try:
        server.check_inference_key(request)
        names = server.repository.names()
        model = request.headers.get(TARGET_HEADER)
        if model is None:
            if len(names) != 1:
                raise InvalidInputError(
                    f"{len(names)} models are served here; say which one with the header X-Amzn-SageMaker-Target-Model.",
                    hint=f"Served: {', '.join(names) or 'none'}.",
                )
            model = names[0]
        body = await request.body()
        try:
            parsed = InvocationsBody.model_validate(loads(body, example=EXAMPLE)).root
        except ValidationError as exc:
            raise InvalidInputError(
                f'The body must be {{"inputs": ...}} or the inputs themselves (a text, texts, or images): {validation_summary(exc)}.',
                hint=f"Example: {EXAMPLE}",
            ) from None
        inputs: Any = parsed.inputs if isinstance(parsed, InvocationsObject) else parsed

        lv, results, _ = await server.infer(model, None, info, lambda handler: handler.decode(inputs), request.headers)
        if lv.task == "embedding":
            return Response(dumps({"embeddings": np.stack(results)}), media_type="application/json")
        return Response(dumps({"predictions": results}), media_type="application/json")
    except ModelpressError as exc:
        return _fail(exc)
