"""A client of a running server's management API (rollouts, repository), for the CLI and ``ship``."""

from __future__ import annotations

from typing import Any

from modelpress.errors import (
    ConfigError,
    ModelpressError,
    ModelpressRuntimeError,
    RolloutConflictError,
    RolloutNotFoundError,
    UnauthorizedError,
)

DEFAULT_URL = "http://127.0.0.1:8000"
HTTP_TIMEOUT_S = 60.0  # a rollback may load the previous version first (seconds for a large model)


def call(method: str, url: str, path: str, api_key: str | None, body: dict[str, Any] | None = None) -> Any:
    """One request to the server's management API; an error answer becomes the matching modelpress error."""
    from modelpress.errors import require

    require("httpx", "serve")
    import httpx

    api_key = api_key or local_key(url)
    headers = {"content-type": "application/json"}
    if api_key:
        headers["x-api-key"] = api_key
    try:
        r = httpx.request(method, url.rstrip("/") + path, json=body, headers=headers, timeout=HTTP_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise ModelpressRuntimeError(
            f"Cannot reach the modelpress server at {url} ({type(exc).__name__}: {exc}).",
            hint="Start it (modelpress serve NAME@production --api-key KEY) or pass --url. "
            "To change only the registry: modelpress registry rollback NAME",
        ) from None
    try:
        doc = r.json()
    except ValueError:
        doc = {"error": r.text}
    if r.status_code < 400:
        return doc
    message = doc.get("error") if isinstance(doc, dict) else None
    message = message if isinstance(message, str) else f"HTTP {r.status_code}: {r.text[:500]}"
    known: dict[int, type[ModelpressError]] = {401: UnauthorizedError, 404: RolloutNotFoundError, 409: RolloutConflictError}
    kind = known.get(r.status_code) or (ConfigError if r.status_code < 500 else ModelpressRuntimeError)
    raise kind(message.split("\n")[0], hint=f"(the server at {url} answered {r.status_code})")


def local_key(url: str) -> str | None:
    """The key a server on this machine generated ($MODELPRESS_HOME/server.key), for a loopback ``url``; else None."""
    from urllib.parse import urlsplit

    from modelpress.serving.security import is_loopback, read_key_file

    host = urlsplit(url).hostname or ""
    return read_key_file() if is_loopback(host) else None


__all__ = ["DEFAULT_URL", "HTTP_TIMEOUT_S", "call", "local_key"]
