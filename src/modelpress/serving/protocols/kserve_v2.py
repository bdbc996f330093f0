"""KServe v2 / Open Inference Protocol over REST, as the spec and Triton answer it.

Health: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready`` (503 while loading or draining).
Models: ``GET /v2/models/{m}[/versions/{v}]`` (metadata), ``.../ready``, ``.../config`` (Triton's),
``POST .../infer``. Repository extension (management: always behind the API key):
``POST /v2/repository/index``, ``/v2/repository/models/{m}/load`` and ``.../unload``; a load takes
registry references (``NAME@stage``, ``NAME:VERSION``), the sources the server was configured
with, and folders under ``allow_load_from`` only. Errors are ``{"error": "..."}`` with 400 (bad
input), 401, 403, 404 (unknown model or version), 413, 415, 429 / 503 (+ Retry-After) and 504.

Text models take one ``BYTES`` input ``text`` (shape ``[N]`` or ``[N, 1]``); image models one
numeric input ``image`` (``[N, H, W]`` or ``[N, C, H, W]``, UINT8 0-255 or FP32 0-1).
Embedding models answer ``embedding`` (FP32 ``[N, D]``); classifiers ``label`` (BYTES),
``label_id`` (INT64) and ``scores`` (FP32 ``[N, C]``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from modelpress.errors import ConfigError, InvalidInputError, ModelpressError, UnknownServedModelError
from modelpress.serving.config import MAX_THREADS, BatchConfig
from modelpress.serving.http import dumps, error_response, info_of, json_response, loads, modelpress_version, openapi_body
from modelpress.serving.protocols.tensors import (
    EXAMPLE,
    InferRequest,
    InferRequestBody,
    encode_response,
    parse_request,
    validation_summary,
)

router = APIRouter(tags=["KServe v2"])
EXTENSIONS = ["model_repository", "binary_tensor_data"]

_infer_doc = openapi_body(
    InferRequestBody,
    extra_content={"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},  # the binary tensor extension
)
_infer_doc["parameters"] = [  # the binary tensor extension: the length of the JSON part at the start of the body
    {
        "name": "Inference-Header-Content-Length",
        "in": "header",
        "required": False,
        "description": "With application/octet-stream: the bytes of the JSON header; the tensors' bytes follow it",
        "schema": {"type": "integer", "minimum": 0},
    }
]
# Bodies at least this large are parsed one at a time (ModelServer.large_body_gate, waited for on the loop, not in a
# thread): parsing is mostly C calls that hold the GIL (orjson, numpy; ~0.1 s each for 8 MiB), so parallel parses are
# no faster, and each extra parsing thread is one more the event loop waits behind (two 8 MiB bodies at once stalled
# it for 0.5 s; one at a time, about 0.1 s)
LARGE_BODY_BYTES = 1 << 20
LOAD_EXAMPLE = '{"parameters": {"config": "{\\"source\\": \\"minilm@production\\"}"}}'


class LoadConfig(BaseModel):
    """What a load request may set: the source and how it runs (runtime options come from the server's config file only)."""

    model_config = ConfigDict(extra="forbid")
    source: str | None = Field(None, min_length=1, max_length=1024)
    version: str | None = Field(None, min_length=1, max_length=128)
    runtime: Literal["torch", "onnxruntime", "openvino", "aoti", "torchscript", "executorch"] | None = None
    task: str | None = Field(None, max_length=64)
    threads: int | None = Field(None, ge=1, le=MAX_THREADS)
    batching: BatchConfig | None = None
    max_text_chars: int | None = Field(None, ge=1, le=10_000_000)
    warmup: bool | None = None


class LoadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: str | LoadConfig | None = Field(None, description="The model config, as a JSON string (tritonclient) or an object")
    source: str | None = Field(None, min_length=1, max_length=1024)
    version: str | None = Field(None, min_length=1, max_length=128)
    runtime: Literal["torch", "onnxruntime", "openvino", "aoti", "torchscript", "executorch"] | None = None


class LoadRequest(BaseModel):
    """``POST /v2/repository/models/{m}/load``: an empty body reloads the model from where it came from."""

    model_config = ConfigDict(extra="forbid")
    parameters: LoadParameters | None = None


class UnloadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | int | None = Field(None, description="Unload only this version (not the one traffic goes to)")
    unload_dependents: bool | None = None  # tritonclient sends it; ignored


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parameters: UnloadParameters | None = None


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ready: bool | None = None


def _server(request: Request) -> Any:
    return request.app.state.server


def _fail(exc: ModelpressError) -> Response:
    """The kserve_v2 error answer of a modelpress error (anything else reaches the app's handlers)."""
    return error_response(exc, "kserve_v2")


# -- health and metadata ---------------------------------------------------------------------
@router.get("/v2", summary="Server metadata")
async def server_metadata() -> Response:
    return json_response({"name": "modelpress", "version": modelpress_version(), "extensions": EXTENSIONS})


@router.get("/v2/health/live", summary="Liveness")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready", summary="Readiness (503 while models load or the server drains)")
async def ready(request: Request) -> Response:
    ok = _server(request).ready
    return json_response({"ready": ok}, 200 if ok else 503)


def _metadata(server: Any, model: str, version: str | None) -> dict[str, Any]:
    lv = server.repository.get(model, version)
    router_ = server.repository.routers[model]
    return {
        "name": model,
        "versions": sorted(router_.versions) if version is None else [lv.version],
        "platform": f"modelpress_{lv.runtime}",
        "inputs": [t.to_json() for t in lv.handler.inputs_info()],
        "outputs": [t.to_json() for t in lv.handler.outputs_info()],
        "parameters": {
            "task": lv.task,
            "default_version": router_.default_version,
            "policy": router_.policy.describe() if router_.policy else None,
        },
    }


def _describe(describe: Callable[[Any, str, str | None], dict[str, Any]], request: Request, model: str, version: str | None) -> Response:
    """A model (version) description as JSON, or the kserve_v2 error (metadata and config alike)."""
    try:
        return json_response(describe(_server(request), model, version))
    except ModelpressError as exc:
        return _fail(exc)


@router.get("/v2/models/{model}", summary="Model metadata")
async def model_metadata(request: Request, model: str) -> Response:
    return _describe(_metadata, request, model, None)


@router.get("/v2/models/{model}/versions/{version}", summary="Model version metadata")
async def model_version_metadata(request: Request, model: str, version: str) -> Response:
    return _describe(_metadata, request, model, version)


def _ready(request: Request, model: str, version: str | None) -> Response:
    server = _server(request)
    try:
        lv = server.repository.get(model, version)
    except UnknownServedModelError as exc:
        if version is None and server.repository.is_expected(model) and model in server.repository.failed:
            return json_response({"name": model, "ready": False, "error": "its last load failed (the server log has why)"}, 503)
        return _fail(exc)
    except ModelpressError:  # loading: no policy yet
        return json_response({"name": model, "ready": False, "error": "loading"}, 503)
    ok = lv.batcher.accepting and not server.draining
    return json_response({"name": model, "version": lv.version, "ready": ok}, 200 if ok else 503)


@router.get("/v2/models/{model}/ready", summary="Model readiness")
async def model_ready(request: Request, model: str) -> Response:
    return _ready(request, model, None)


@router.get("/v2/models/{model}/versions/{version}/ready", summary="Model version readiness")
async def model_version_ready(request: Request, model: str, version: str) -> Response:
    return _ready(request, model, version)


def _triton_tensor(t: Any) -> dict[str, Any]:
    """A tensor as Triton's model configuration describes it (dims without the batch axis)."""
    return {"name": t.name, "data_type": f"TYPE_{'STRING' if t.datatype == 'BYTES' else t.datatype}", "dims": list(t.shape[1:]) or [1]}


def _model_config(server: Any, model: str, version: str | None) -> dict[str, Any]:
    lv = server.repository.get(model, version)
    b = lv.config.batching
    tensor = _triton_tensor
    return {
        "name": model,
        "platform": f"modelpress_{lv.runtime}",
        "max_batch_size": b.max_batch_size,
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(b.max_queue_delay_ms * 1000),
            "default_queue_policy": {"max_queue_size": b.max_queue_size},
        },
        "instance_group": [{"count": b.instances, "kind": "KIND_CPU"}],
        "input": [tensor(t) for t in lv.handler.inputs_info()],
        "output": [tensor(t) for t in lv.handler.outputs_info()],
        "parameters": {"source": lv.public_source, "task": lv.task, "registry_ref": lv.registry_ref},
    }


@router.get("/v2/models/{model}/config", summary="Model configuration (Triton's extension)")
async def model_config(request: Request, model: str) -> Response:
    return _describe(_model_config, request, model, None)


@router.get("/v2/models/{model}/versions/{version}/config", summary="Model version configuration (Triton's extension)")
async def model_version_config(request: Request, model: str, version: str) -> Response:
    return _describe(_model_config, request, model, version)


# -- inference -------------------------------------------------------------------------------
def _task_inputs(kind: str, req: InferRequest, expected: list[str]) -> Any:
    """The task inputs (texts or an image array) in a decoded infer request."""
    if len(req.inputs) != 1:
        raise InvalidInputError(
            f"This model takes one input ({', '.join(expected)}); "
            f"the request has {len(req.inputs)} ({', '.join(t.name for t in req.inputs)}).",
            hint=f"Example: {EXAMPLE}",
        )
    t = req.inputs[0]
    aliases = {"text": ("text", "texts", "input", "INPUT0"), "image": ("image", "images", "pixel_values", "input", "INPUT0")}.get(
        kind, tuple(expected)
    )
    if t.name not in aliases:
        raise InvalidInputError(f"This model has no input '{t.name}'; it takes '{expected[0]}'.", hint=f"Example: {EXAMPLE}")
    if kind == "text":
        if t.datatype != "BYTES":
            raise InvalidInputError(
                f"Input '{t.name}' must be BYTES (strings) for this text model, not {t.datatype}.", hint=f"Example: {EXAMPLE}"
            )
        if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1):
            raise InvalidInputError(
                f"Input '{t.name}' has the shape {t.shape}; a text model takes [N] or [N, 1].", hint=f"Example: {EXAMPLE}"
            )
        return t.data
    if t.datatype == "BYTES":
        raise InvalidInputError(f"Input '{t.name}' must be numbers (UINT8 pixels or FP32) for this image model, not BYTES.")
    return t.data


async def _infer(request: Request, model: str, version: str | None) -> Response:
    server = _server(request)
    info = info_of(request)
    if model in server.repository.routers:  # label bad requests to a served model with its name
        info.model = model
    try:
        server.check_inference_key(request)
        server.repository.check_served(model, version)  # 404 before the body is read, whatever its size
        body = await request.body()
        # parsing walks up to body-size elements in Python (flatten, type checks, numpy conversion): a worker thread keeps
        # the event loop answering; max_concurrent_requests bounds how many such threads there are
        header_length = request.headers.get("inference-header-content-length")
        if len(body) < LARGE_BODY_BYTES:
            req = await asyncio.to_thread(parse_request, body, header_length)
        else:
            async with server.large_body_gate:
                req = await asyncio.to_thread(parse_request, body, header_length)
        lv, results, _ = await server.infer(
            model, version, info, lambda h: h.decode(_task_inputs(h.kind, req, [t.name for t in h.inputs_info()])), request.headers
        )
        payload, headers = encode_response(lv.name, lv.version, req, lv.handler.tensors(results))
        return Response(payload, headers=headers)
    except ModelpressError as exc:
        return _fail(exc)


@router.post("/v2/models/{model}/infer", summary="Inference", openapi_extra=_infer_doc)
async def infer(request: Request, model: str) -> Response:
    return await _infer(request, model, None)


@router.post("/v2/models/{model}/versions/{version}/infer", summary="Inference on one version", openapi_extra=_infer_doc)
async def infer_version(request: Request, model: str, version: str) -> Response:
    return await _infer(request, model, version)


# -- repository extension (management: API key) ---------------------------------------------
async def _json_body(request: Request, kind: type[BaseModel], example: str) -> Any:
    """The body validated as ``kind`` (an empty body is ``kind()``)."""
    body = await request.body()
    doc = loads(body, example=example) if body.strip() else {}
    try:
        return kind.model_validate(doc)
    except ValidationError as exc:
        raise InvalidInputError(f"Invalid request: {validation_summary(exc)}.", hint=f"Example: {example}") from None


@router.post(
    "/v2/repository/index",
    summary="Models known to the server and their state (API key)",
    openapi_extra=openapi_body(IndexRequest, required=False),
)
async def repository_index(request: Request) -> Response:
    server = _server(request)
    try:
        server.check_management_key(request)
        doc = await _json_body(request, IndexRequest, '{"ready": true}')
        rows = server.repository_index()
        if doc.ready:
            rows = [r for r in rows if r["state"] == "READY"]
        return json_response(rows)
    except ModelpressError as exc:
        return _fail(exc)


@router.post(
    "/v2/repository/models/{model}/load",
    summary="Load or reload a model; a new version becomes the default (hot swap; API key)",
    openapi_extra=openapi_body(LoadRequest, required=False),
)
async def repository_load(request: Request, model: str) -> Response:
    server = _server(request)
    try:
        server.check_management_key(request)
        params = (await _json_body(request, LoadRequest, LOAD_EXAMPLE)).parameters or LoadParameters()
        overrides: dict[str, Any] = {}
        cfg = params.config
        if isinstance(cfg, str):  # tritonclient.load_model(name, config=json.dumps({...}))
            try:
                cfg = LoadConfig.model_validate(orjson.loads(cfg))
            except orjson.JSONDecodeError as exc:
                raise InvalidInputError(f"parameters.config is not JSON: {exc}.", hint=f"Example: {LOAD_EXAMPLE}") from None
            except ValidationError as exc:
                raise InvalidInputError(f"Invalid parameters.config: {validation_summary(exc)}.", hint=f"Example: {LOAD_EXAMPLE}") from None
        if cfg is not None:
            overrides = cfg.model_dump(exclude_none=True)
        overrides.update(params.model_dump(include={"source", "version", "runtime"}, exclude_none=True))
        if "source" in overrides:
            server.repository.check_load_source(overrides["source"])
        server.repository.check_room_for(model)
        cfg_obj = server.repository.config_for(model, overrides)
        try:
            await server.repository.load(cfg_obj)
        except ModelpressError as exc:
            if isinstance(exc, ConfigError | InvalidInputError):
                raise
            raise ConfigError(f"Loading '{model}' from '{cfg_obj.source}' failed: {exc.message}", hint=exc.hint) from None
        return Response(b"", media_type="application/json")
    except ModelpressError as exc:
        return _fail(exc)


@router.post(
    "/v2/repository/models/{model}/unload",
    summary="Unload a model, or one version with parameters.version (API key)",
    openapi_extra=openapi_body(UnloadRequest, required=False),
)
async def repository_unload(request: Request, model: str) -> Response:
    server = _server(request)
    try:
        server.check_management_key(request)
        params = (await _json_body(request, UnloadRequest, '{"parameters": {"version": "2"}}')).parameters
        version = params.version if params is not None else None
        await server.repository.unload(model, str(version) if version is not None else None)
        return Response(b"", media_type="application/json")
    except ModelpressError as exc:
        return _fail(exc)


__all__ = ["dumps", "router"]
