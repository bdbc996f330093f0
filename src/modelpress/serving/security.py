"""What the server lets in: the management key, which routes are public, Host and Content-Type checks, and a
server-wide limit on requests answered at once. ``docs/security.md`` is the threat model behind it.

Closed by default: every route is a *management* route (it needs the key) unless it is one of the
public kinds below. A server started without a key generates one at start, writes it to
:func:`key_file` (``$MODELPRESS_HOME/server.key``, mode 0600, readable by its user only) and logs it
once; clients on the same machine (``modelpress rollout ...``, :mod:`modelpress.rollout.client`) read
it from there. ``management: false`` switches management routes off instead (403).

| kind | routes | public unless |
|---|---|---|
| inference | ``/v2/models...`` (metadata, infer), ``/v1/...``, ``/invocations`` | ``protect_inference`` |
| health | ``/v2``, ``/v2/health/*``, ``/v2/models/{m}[/versions/{v}]/ready``, ``/ping`` | ``protect_health`` |
| metrics | ``/metrics`` | ``protect_metrics`` |
| dashboard | ``/dashboard``, ``/dashboard/*`` | ``protect_dashboard`` |
| docs | ``/docs``, ``/redoc``, ``/openapi.json`` | ``protect_docs`` |
| management | everything else: ``/v2/repository/*``, ``/rollouts*``, ``/feedback``, unknown paths | always needs the key |

The :class:`GuardMiddleware` checks, in this order: the Host header (only on a loopback bind, against
DNS rebinding), the key, the Content-Type of a POST, and the number of requests being answered.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from modelpress.errors import (
    ConfigError,
    DisallowedHostError,
    ForbiddenError,
    ServerBusyError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from modelpress.serving.auth import check_key

log = logging.getLogger("modelpress.serving")

KEY_FILE_NAME = "server.key"
KEY_BYTES = 32  # secrets.token_urlsafe(32): 256 bits
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
BUSY_RETRY_AFTER_S = 1  # Retry-After of a 503 from the concurrency limit: requests finish in milliseconds to seconds
PUBLIC_KINDS = ("inference", "health", "metrics", "dashboard", "docs")
_DOCS_PATHS = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
_HEALTH_PATHS = frozenset({"/v2", "/v2/health/live", "/v2/health/ready", "/ping"})
_JSON_TYPES = frozenset({"application/json"})
BINARY_TENSOR_TYPE = "application/octet-stream"  # the KServe binary tensor extension's body


# -- route kinds -----------------------------------------------------------------------------
def route_kind(path: str) -> str:
    """``inference``, ``health``, ``metrics``, ``dashboard``, ``docs`` or ``management`` (the table above)."""
    if path in _HEALTH_PATHS or _is_model_ready(path):
        return "health"
    if path == "/metrics":
        return "metrics"
    if path == "/dashboard" or path.startswith("/dashboard/"):
        return "dashboard"
    if path in _DOCS_PATHS:
        return "docs"
    if path == "/v2/models" or path.startswith(("/v2/models/", "/v1/")) or path == "/invocations":
        return "inference"
    return "management"


def _is_model_ready(path: str) -> bool:
    """``/v2/models/{m}/ready`` or ``/v2/models/{m}/versions/{v}/ready`` (not the metadata of a model named 'ready')."""
    parts = path.split("/")
    if parts[:3] != ["", "v2", "models"] or parts[-1] != "ready":
        return False
    return (len(parts) == 5 and parts[3] != "") or (len(parts) == 7 and parts[4] == "versions" and "" not in parts[3:6:2])


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# -- the key file ------------------------------------------------------------------------------
def key_file() -> Path:
    """Where a server without a configured key keeps the key it generated: ``$MODELPRESS_HOME/server.key``."""
    from modelpress.locations import home_dir

    return home_dir() / KEY_FILE_NAME


def read_key_file(path: Path | None = None) -> str | None:
    """The key in ``path`` (default :func:`key_file`), or None when there is none.

    The file must be a regular file (not a link) owned by this user and readable by nobody else;
    otherwise :class:`ConfigError` (a key others can read is no key).
    """
    path = path or key_file()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o077:
        raise ConfigError(
            f"The server key file '{path}' is not a private file of this user (a link, another owner, or readable by others).",
            hint=f"Delete it (a new key is generated at the next start) or fix it: chmod 600 '{path}'.",
        )
    key = path.read_text(encoding="utf-8").strip()
    if len(key) < 8:
        raise ConfigError(f"The server key file '{path}' holds no key.", hint="Delete it; the next `modelpress serve` writes a new one.")
    return key


def load_or_create_key(path: Path | None = None) -> tuple[str, bool]:
    """(the key in :func:`key_file`, True when it was created now). Created atomically with mode 0600."""
    path = path or key_file()
    existing = read_key_file(path)
    if existing is not None:
        return existing, False
    key = secrets.token_urlsafe(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
        try:
            os.link(tmp, path)  # fails when another server wrote one first: then that one is the key
            created = True
        except FileExistsError:
            created = False
        except OSError:  # a filesystem without hard links: create the file itself, exclusively
            created = _create_exclusive(path, key)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if not created:
        other = read_key_file(path)
        if other is None:  # removed again at once by someone else: start over
            return load_or_create_key(path)
        return other, False
    return key, True


def _create_exclusive(path: Path, key: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    return True


# -- the middleware ------------------------------------------------------------------------------
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


def _host_name(raw: bytes) -> str:
    text = raw.decode("latin-1").strip().lower()
    if text.startswith("["):  # [::1]:8000
        return text[: text.find("]") + 1] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class GuardMiddleware:
    """Host, key, Content-Type and concurrency checks before any endpoint runs (see the module docstring).

    ``server`` is the :class:`~modelpress.serving.app.ModelServer`: its config says what is
    protected, ``server.api_key`` is the key, ``server.check_host`` whether Host is checked, and
    ``server.answering`` counts the requests being answered (health and metrics not counted).
    Errors are raised as modelpress errors; the serving middleware around this one answers them.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], *, server: Any) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server, cfg = self.server, self.server.config
        path = scope["path"]
        if server.check_host:
            raw = _header(scope, b"host")
            if raw is not None:
                name = _host_name(raw)
                if name not in LOOPBACK_NAMES and name not in cfg.allowed_hosts:
                    raise DisallowedHostError(
                        f"This server listens on a loopback address and does not answer for the host {name[:100]!r}.",
                        hint="Call it as http://127.0.0.1:PORT or http://localhost:PORT, or list the name in allowed_hosts "
                        "(--allowed-host) when a proxy forwards it.",
                    )
        kind = route_kind(path)
        if kind == "management":
            if not cfg.management:
                raise ForbiddenError(
                    "Management routes are switched off on this server.", hint="Start it with management on (the default)."
                )
            check_key(_key_of(scope), server.api_key, what="management endpoints")
        elif getattr(cfg, f"protect_{kind}"):
            try:
                check_key(_key_of(scope), server.api_key, what=f"{kind} endpoints")
            except UnauthorizedError as exc:
                if kind in ("dashboard", "docs"):  # pages a browser opens: it asks for the key (any user name) and sends it
                    exc.challenge = 'Basic realm="modelpress", charset="UTF-8"'  # type: ignore[attr-defined]
                raise
        method = scope.get("method", "GET")
        if method in ("POST", "PUT", "PATCH"):
            _check_content_type(scope, path)
        if kind in ("health", "metrics"):  # probes and scrapes answer even when the server is full
            await self.app(scope, receive, send)
            return
        if server.answering >= cfg.max_concurrent_requests:
            raise ServerBusyError(
                f"The server is answering {server.answering} requests, as many as it takes at once.",
                retry_after_s=BUSY_RETRY_AFTER_S,
                hint="Retry after the time in the Retry-After header, or raise max_concurrent_requests in the server config.",
            )
        server.answering += 1
        try:
            await self.app(scope, receive, send)
        finally:
            server.answering -= 1


def _key_of(scope: Scope) -> str | None:
    from modelpress.serving.auth import key_from_headers

    headers: dict[str, str] = {}
    for k, v in scope["headers"]:
        if k in (b"x-api-key", b"authorization"):
            headers[k.decode("latin-1")] = v.decode("latin-1")
    return key_from_headers(headers)


def _check_content_type(scope: Scope, path: str) -> None:
    """POST bodies are JSON (or the binary tensor type on /infer); text/plain, forms and multipart answer 415.

    Those three are what a web page can send cross-site without a CORS preflight. A POST with no
    Content-Type is accepted when it has no body, and on the KServe v2 routes (tritonclient sends none).
    """
    raw = _header(scope, b"content-type")
    if raw is None:
        length = _header(scope, b"content-length")
        chunked = _header(scope, b"transfer-encoding") is not None
        if path.startswith("/v2/") or (not chunked and (length is None or length.strip() in (b"", b"0"))):
            return
        ctype = ""
    else:
        ctype = raw.decode("latin-1").split(";", 1)[0].strip().lower()
        if ctype in _JSON_TYPES or (ctype.startswith("application/") and ctype.endswith("+json")):
            return
        if ctype == BINARY_TENSOR_TYPE and path.endswith("/infer"):
            return
    raise UnsupportedMediaTypeError(
        f"This endpoint reads JSON; the request's Content-Type is {ctype[:100] or 'missing'!r}.",
        hint="Send the body as JSON with 'Content-Type: application/json' "
        "(KServe binary tensors: 'application/octet-stream' with Inference-Header-Content-Length).",
    )


__all__ = [
    "KEY_FILE_NAME",
    "PUBLIC_KINDS",
    "GuardMiddleware",
    "is_loopback",
    "key_file",
    "load_or_create_key",
    "read_key_file",
    "route_kind",
]
