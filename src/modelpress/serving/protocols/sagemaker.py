"""SageMaker's container contract: ``GET /ping`` and ``POST /invocations``, so the same image runs there.

``/invocations`` takes JSON (``{"inputs": ...}`` or the inputs themselves: a string, a list of
strings, or nested pixel lists for an image model) or ``text/plain`` (one text). With several
models served, the header ``X-Amzn-SageMaker-Target-Model`` names one (else the only one).
Embedding models answer ``{"embeddings": [[...], ...]}``; classifiers ``{"predictions": [...]}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from modelpress.errors import InvalidInputError, ModelpressError
from modelpress.serving.http import dumps, error_response, info_of, json_response, loads

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
    openapi_extra={"requestBody": {"content": {"application/json": {"example": {"inputs": ["A man is playing a guitar."]}}}}},
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
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype.startswith("text/"):
            try:
                inputs: Any = [body.decode("utf-8")]
            except UnicodeDecodeError:
                raise InvalidInputError("The text body is not UTF-8.") from None
        else:
            doc = loads(body, example=EXAMPLE)
            inputs = doc["inputs"] if isinstance(doc, dict) and "inputs" in doc else doc
            if isinstance(doc, dict) and "inputs" not in doc:
                raise InvalidInputError("The JSON object has no 'inputs'.", hint=f"Example: {EXAMPLE}")

        lv, results, _ = await server.infer(model, None, info, lambda handler: handler.decode(inputs), request.headers)
        if lv.task == "embedding":
            return Response(dumps({"embeddings": np.stack(results)}), media_type="application/json")
        return Response(dumps({"predictions": results}), media_type="application/json")
    except ModelpressError as exc:
        return _fail(exc)
