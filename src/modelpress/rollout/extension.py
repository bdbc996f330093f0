"""Rollouts plugged into the model server: the controller, its HTTP API, the dashboard, the shadow statistics.

    from modelpress.rollout import RolloutServer, serve
    server = RolloutServer(config)        # a ModelServer with rollouts: server.rollouts, server.observations
    serve(config)                         # what `modelpress serve` runs: the same, until Ctrl-C / SIGTERM

    with_rollouts(ModelServer(config))    # the same extension added to a server built elsewhere

:class:`RolloutExtension` is a :class:`~modelpress.serving.extensions.ServerExtension`: it
records every request and shadow copy in its :class:`~modelpress.rollout.observations.Observations`,
adds the management API (``/rollouts``, ``/feedback``) and the dashboard (``/dashboard``), resumes
the rollouts the registry says were running when the server starts, and stops watching them
when it stops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from modelpress.rollout.controller import RolloutManager
from modelpress.rollout.observations import Observations
from modelpress.rollout.shadow import ShadowRecorder
from modelpress.serving.app import ModelServer
from modelpress.serving.app import serve as serve_plain
from modelpress.serving.config import ServerConfig
from modelpress.serving.extensions import ServerExtension

NAME = "rollouts"


class RolloutExtension(ServerExtension):
    """Rollouts, their management API and the dashboard, for one server. ``clock``: see :class:`RolloutManager`."""

    name = NAME

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.server: Any = None
        self.observations = Observations(clock=clock)  # per-version requests, shadow copies, feedback
        self.manager: RolloutManager | None = None

    def attach(self, server: ModelServer) -> None:
        self.server = server
        from modelpress.rollout.ownership import default_owner

        owner = default_owner(server.config.port)
        self.manager = RolloutManager(server.repository, self.observations, server.config.registry, clock=self.clock, owner=owner)

        def is_loaded(model: str, version: str) -> bool:
            router = server.repository.routers.get(model)
            return router is not None and version in router.versions

        self.observations.is_loaded = is_loaded  # the records of unloaded versions are dropped past a few
        server.request_observers.append(self.observations.answered)
        server.mirror.observers.append(ShadowRecorder(self.observations, server.metrics))
        server.app.state.rollouts = self  # how the API and the dashboard find it

    def routers(self) -> list[Any]:
        from modelpress.rollout.api import router as api_router
        from modelpress.rollout.dashboard import router as dashboard_router

        return [api_router, dashboard_router]

    async def start(self) -> None:
        await self.rollouts.resume_all()  # rollouts the registry says were running here pick up where they were

    async def stop(self) -> None:
        await self.rollouts.close()

    @property
    def rollouts(self) -> RolloutManager:
        if self.manager is None:
            raise RuntimeError("The rollout extension is not attached to a server yet (ModelServer(config, extensions=[...])).")
        return self.manager


class RolloutServer(ModelServer):
    """A :class:`~modelpress.serving.app.ModelServer` with rollouts: ``.rollouts`` (the controller) and ``.observations``."""

    def __init__(
        self, config: ServerConfig | None = None, *, extensions: Sequence[ServerExtension] = (), clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rollout_extension = RolloutExtension(clock=clock)
        super().__init__(config, extensions=[self.rollout_extension, *extensions])

    @property
    def rollouts(self) -> RolloutManager:
        return self.rollout_extension.rollouts

    @property
    def observations(self) -> Observations:
        return self.rollout_extension.observations


def with_rollouts(server: ModelServer) -> ModelServer:
    """Add rollouts (and their API and dashboard) to ``server`` before it starts; returns it."""
    server.add_extension(RolloutExtension())
    return server


def serve(config: ServerConfig) -> None:
    """Serve ``config`` with rollouts until SIGINT / SIGTERM (what ``modelpress serve`` runs)."""
    serve_plain(config, server=RolloutServer(config))


__all__ = ["NAME", "RolloutExtension", "RolloutServer", "serve", "with_rollouts"]
