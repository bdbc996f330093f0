"""The server's extension point: what a package above serving may plug into a :class:`ModelServer`.

    server = ModelServer(config, extensions=[MyExtension()])   # or server.add_extension(...) before it starts

An extension is attached once (``attach``: it may add request observers and mirror observers,
and keep a reference to the server), contributes HTTP routes (``routers``: FastAPI routers
included in the server's app), and is told when the server has loaded its models (``start``)
and before it drains them (``stop``). The rollout package is one
(:class:`modelpress.rollout.extension.RolloutExtension`): its controller, management API,
dashboard and shadow statistics.

A request observer is called once per request a version answered or failed (not for bad
client input, nor for a version being swapped out, which is routed again):
``observer(model, version, seconds, ok, request_id)``.
"""

from __future__ import annotations

from typing import Any, Protocol


class RequestObserver(Protocol):
    def __call__(self, model: str, version: str, seconds: float, ok: bool, request_id: str | None) -> None: ...


class ServerExtension:
    """Base class of extensions: every hook does nothing unless overridden. ``name`` must be unique per server."""

    name: str = "extension"

    def attach(self, server: Any) -> None:
        """Called once with the :class:`~modelpress.serving.app.ModelServer`, when the extension is added (before it starts)."""

    def routers(self) -> list[Any]:
        """FastAPI routers to include in the server's app."""
        return []

    async def start(self) -> None:
        """Called on the server's event loop after the configured models are loaded."""

    async def stop(self) -> None:
        """Called when the server stops, before its models drain."""


__all__ = ["RequestObserver", "ServerExtension"]
