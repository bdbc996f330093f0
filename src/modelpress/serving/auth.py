"""API keys: management endpoints require one when the server has a key; inference optionally too.

A key is read from ``X-API-Key: KEY`` or ``Authorization: Bearer KEY`` (what the OpenAI client
sends), or as the password of ``Authorization: Basic`` (what a browser sends after asking, for a
dashboard behind the key), and compared in constant time (:func:`hmac.compare_digest`), so the
time taken does not tell how much of a guess was right.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping

from modelpress.errors import UnauthorizedError


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The key a request carries, or None."""
    key = headers.get("x-api-key")
    if key:
        return key
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            _user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or None
    return None


def check_key(provided: str | None, expected: str | None, *, what: str = "this endpoint") -> None:
    """Raise :class:`UnauthorizedError` unless ``expected`` is None or ``provided`` matches it."""
    if expected is None:
        return
    if provided is None:
        raise UnauthorizedError(
            f"An API key is required for {what}.",
            hint="Send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY' (the server's --api-key).",
        )
    if not hmac.compare_digest(provided.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")):
        raise UnauthorizedError(
            f"The API key sent for {what} is wrong.", hint="Send the key the server was started with (--api-key or MODELPRESS_API_KEY)."
        )
