"""The HTTP plumbing every protocol shares: JSON in and out, errors to status codes, and one ASGI
middleware for request ids, the body limit, the access log and the request metrics.

The middleware is plain ASGI (no per-request Request objects or task groups): it reads the
two headers it needs, counts body bytes as they arrive (413 beyond ``max_body_bytes``, before
a large body is read when Content-Length says so), echoes ``x-request-id`` (the client's, when
it sent a sane one, else a new one), and after the response records
``modelpress_requests_total`` / ``request_duration_seconds`` and one JSON access-log line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.responses import Response

from modelpress.errors import (
    ForbiddenError,
    InvalidInputError,
    ModelNotReadyError,
    ModelpressError,
    PayloadTooLargeError,
    RequestBodyTimeoutError,
    RequestTimeoutError,
    RolloutConflictError,
    RolloutNotFoundError,
    ServerBusyError,
    ServerOverloadedError,
    UnauthorizedError,
    UnknownServedModelError,
    UnsupportedMediaTypeError,
    UserInputError,
)
from modelpress.serving.batching import request_timing
from modelpress.serving.config import BODY_READ_TIMEOUT_S
from modelpress.serving.metrics import Metrics

access_log = logging.getLogger("modelpress.access")
log = logging.getLogger("modelpress.serving")

MAX_REQUEST_ID = 128
MAX_JSON_DEPTH = 1024  # orjson's nesting limit (arrays and objects); deeper documents answer 400
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


class RequestInfo:
    """Per-request facts the middleware reports: filled in by the endpoint that answers."""

    __slots__ = ("model", "protocol", "request_id", "version")

    def __init__(self, request_id: str, protocol: str) -> None:
        self.request_id = request_id
        self.protocol = protocol
        self.model = ""
        self.version = ""


def info_of(request: Any) -> RequestInfo:
    info = request.scope.get("modelpress")
    if info is None:  # an app mounted without the middleware
        info = request.scope["modelpress"] = RequestInfo(os.urandom(8).hex(), protocol_of(request.scope.get("path", "")))
    return info


def protocol_of(path: str) -> str:
    if path.startswith("/v2"):
        return "kserve_v2"
    if path.startswith("/v1"):
        return "openai"
    if path in ("/invocations", "/ping"):
        return "sagemaker"
    if path == "/metrics":
        return "metrics"
    return "other"


def modelpress_version() -> str:
    """The installed modelpress version (what the server reports; read from the package metadata, not the package)."""
    from importlib import metadata

    try:
        return metadata.version("modelpress")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
        return "unknown"


# -- JSON ----------------------------------------------------------------------------------
def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=_JSON_OPTS)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def loads(body: bytes | memoryview, *, example: str) -> Any:
    """Parse a JSON body; malformed JSON, NaN/Infinity literals and nesting deeper than :data:`MAX_JSON_DEPTH` answer
    400 with what is wrong. The error is read off orjson's message and position: the body is never parsed twice."""
    if not body:
        raise InvalidInputError("The request body is empty; a JSON document was expected.", hint=f"Example: {example}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in exc.msg or "recursion" in exc.msg.lower():
            raise InvalidInputError(
                f"The request body is JSON nested more than {MAX_JSON_DEPTH} levels deep (arrays or objects).",
                hint=f"Send a flatter document. Example: {example}",
            ) from None
        at = bytes(body[exc.pos : exc.pos + 8]) if isinstance(exc.pos, int) else b""
        if at.startswith((b"NaN", b"Infinity")):  # literals Python's json writes, which JSON does not have: say so
            raise InvalidInputError(
                "The request holds NaN or Infinity, which are not JSON numbers and are not accepted as model inputs.",
                hint="Send finite numbers (replace NaN before sending).",
            ) from None
        raise InvalidInputError(f"The request body is not valid JSON: {exc}.", hint=f"Example: {example}") from None


# -- errors --------------------------------------------------------------------------------
# The HTTP status of each kind of error, the first class that matches wins (so UserInputError, the base of several, is last).
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (UnknownServedModelError, 404),
    (RolloutNotFoundError, 404),
    (RolloutConflictError, 409),
    (PayloadTooLargeError, 413),
    (UnauthorizedError, 401),
    (RequestBodyTimeoutError, 408),
    (ForbiddenError, 403),
    (UnsupportedMediaTypeError, 415),
    (ServerBusyError, 503),
    (ServerOverloadedError, 429),
    (RequestTimeoutError, 504),
    (ModelNotReadyError, 503),
    (UserInputError, 400),
)


def status_for(exc: BaseException) -> int:
    """The HTTP status an error answers with (500 for anything not in the table)."""
    return next((status for cls, status in _STATUS if isinstance(exc, cls)), 500)


def message_of(exc: BaseException) -> str:
    if isinstance(exc, ModelpressError):
        return exc.message + (f" {exc.hint}" if exc.hint else "")
    return str(exc) or type(exc).__name__


GENERIC_500 = "Internal error (request id {request_id}); the server log has the details."


def error_headers(exc: BaseException, status: int) -> dict[str, str]:
    if isinstance(exc, ServerOverloadedError):
        return {"Retry-After": str(exc.retry_after_s)}
    if status == 401:  # Basic where a browser should ask for the key (the dashboard), else Bearer
        return {"WWW-Authenticate": getattr(exc, "challenge", None) or "Bearer"}
    if status == 408:  # the rest of the body may still come: the connection cannot carry another request
        return {"Connection": "close"}
    return {}


def error_body(protocol: str, status: int, message: str) -> bytes:
    """``{"error": "..."}`` (KServe v2, as Triton answers) or OpenAI's ``{"error": {"message", "type", ...}}``."""
    if protocol == "openai":
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        return dumps({"error": {"message": message, "type": kind, "param": None, "code": status}})
    return dumps({"error": message})


def error_response(exc: BaseException, protocol: str, request_id: str = "") -> Response:
    """The JSON error answer of ``exc``. An error without a status of its own (500) answers a generic message, never
    its text (which may hold file paths or library internals); the detail goes to the server log."""
    status = status_for(exc)
    if status == 500:
        log.error("internal error (request id %s): %s", request_id or "-", message_of(exc))
        message = GENERIC_500.format(request_id=request_id or "-")
    else:
        message = message_of(exc)
    return Response(
        error_body(protocol, status, message), status_code=status, media_type="application/json", headers=error_headers(exc, status)
    )


# -- the middleware ------------------------------------------------------------------------
def server_timing_header(timing: dict[str, float]) -> bytes:
    """``decode;dur=0.412, queue;dur=0.020, batch;dur=12.113``: the stages in milliseconds (the Server-Timing syntax)."""
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in timing.items()).encode("ascii")


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _request_id(raw: bytes | None) -> str:
    if raw:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if 0 < len(text) <= MAX_REQUEST_ID and text.isprintable():
            return text
    return os.urandom(8).hex()


class ServingMiddleware:
    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        *,
        metrics: Metrics,
        max_body_bytes: int,
        access_log_enabled: bool = True,
        body_timeout_s: float = BODY_READ_TIMEOUT_S,
        server_timing: bool = False,
    ) -> None:
        self.app = app
        self.server_timing = server_timing
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.access_log = access_log_enabled
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid_raw = length_raw = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid_raw = v
            elif k == b"content-length":
                length_raw = v
        path = scope["path"]
        info = RequestInfo(_request_id(rid_raw), protocol_of(path))
        scope["modelpress"] = info
        rid_header = (b"x-request-id", info.request_id.encode("ascii"))
        state = {"status": 500, "started": False, "bytes_out": 0, "bytes_in": 0}
        timing: dict[str, float] | None = None
        token = None
        if self.server_timing:
            timing = {}
            token = request_timing.set(timing)  # this request's task: the server and the batcher fill it in

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
                message["headers"] = [*message.get("headers", ()), rid_header]
                if timing:
                    message["headers"].append((b"server-timing", server_timing_header(timing)))
            elif message["type"] == "http.response.body":
                state["bytes_out"] += len(message.get("body", b""))
            await send(message)

        limit = self.max_body
        body_timeout = self.body_timeout_s
        body: dict[str, Any] = {"done": False, "deadline": None}

        async def receive_limited() -> dict[str, Any]:
            if body["done"]:  # the body is in: later reads wait for a disconnect (streaming answers), for as long as it takes
                return await receive()
            if body["deadline"] is None:
                body["deadline"] = time.monotonic() + body_timeout
            try:
                message = await asyncio.wait_for(receive(), max(0.0, body["deadline"] - time.monotonic()))
            except TimeoutError:
                raise RequestBodyTimeoutError(
                    f"The request body did not arrive within {body_timeout:g} s ({state['bytes_in']:,} bytes came).",
                    hint="Send the whole body at once; a slow upload is cut off so that it does not hold a request slot.",
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body["done"] = True
            if message["type"] == "http.request":
                state["bytes_in"] += len(message.get("body", b""))
                if state["bytes_in"] > limit:
                    raise PayloadTooLargeError(
                        f"The request body is larger than {limit:,} bytes.",
                        hint="Send less per request, or raise max_body_bytes in the server config.",
                    )
            return message

        try:
            too_big = length_raw is not None and length_raw.isdigit() and int(length_raw) > limit
            if too_big:
                exc = PayloadTooLargeError(
                    f"The request body has {int(length_raw):,} bytes; this server accepts at most {limit:,}.",
                    hint="Send less per request, or raise max_body_bytes in the server config.",
                )
                await error_response(exc, info.protocol)(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive_limited, send_wrapper)
        except Exception as exc:  # anything no endpoint handled: never leak a traceback to the client
            if not isinstance(exc, ModelpressError):
                log.exception("request %s %s failed (request id %s)", scope.get("method"), path, info.request_id)
            if not state["started"]:
                await error_response(exc, info.protocol, info.request_id)(scope, receive, send_wrapper)
        if token is not None:
            request_timing.reset(token)
        elapsed = time.perf_counter() - start
        status = state["status"]
        self.metrics.observe_request(info.model, info.version, info.protocol, status, elapsed)
        if self.access_log and access_log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            access_log.info(
                dumps(
                    {
                        "ts": round(time.time(), 3),
                        "request_id": info.request_id,
                        "method": scope.get("method"),
                        "path": path,
                        "status": status,
                        "ms": round(elapsed * 1000, 3),
                        "model": info.model,
                        "version": info.version,
                        "protocol": info.protocol,
                        "client": f"{client[0]}:{client[1]}" if client else None,
                        "bytes_in": state["bytes_in"],
                        "bytes_out": state["bytes_out"],
                    }
                ).decode()
            )


# -- OpenAPI ---------------------------------------------------------------------------------
def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def openapi_body(model: Any, *, extra_content: dict[str, Any] | None = None, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body itself: the request body's schema is ``model``'s own
    (the pydantic model the handler validates with), so the documented and the accepted body are the same."""
    schema = model.model_json_schema()
    schema = _inline_refs(schema, schema.get("$defs", {}))
    content = {"application/json": {"schema": schema}}
    content.update(extra_content or {})
    return {"requestBody": {"required": required, "content": content}}
