"""The model server: one :class:`ModelServer` object, its ASGI app, and :func:`serve`.

    from modelpress.serving import ModelServer, ServerConfig, ModelConfig
    server = ModelServer(ServerConfig(models=[ModelConfig(source="minilm")]))
    server.run()                        # uvicorn on 127.0.0.1:8000, until Ctrl-C / SIGTERM

    async with server.running():        # in-process (tests): models loaded and warmed up
        async with httpx.AsyncClient(transport=httpx.ASGITransport(server.app)) as client: ...

Request path: protocol codec (KServe v2, OpenAI, SageMaker) -> handler.decode (tokenize) ->
Router (policy) -> Batcher -> Runner in a worker thread -> handler.split -> codec. Every model
is loaded and warmed up before the server reports ready. On SIGTERM the server stops
accepting connections, reports not ready, lets in-flight requests finish within
``drain_timeout_s``, drains the batchers, and exits.

Rollouts (canary, shadow, A/B), their management API and the dashboard are an extension from
the package above (:mod:`modelpress.rollout`): ``modelpress.rollout.RolloutServer(config)`` is
this server with them, and ``modelpress.rollout.serve(config)`` what ``modelpress serve`` runs.
Any :class:`~modelpress.serving.extensions.ServerExtension` plugs in the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal

from starlette.responses import Response

from modelpress.errors import ConfigError, ModelNotReadyError, ModelpressError, ModelpressRuntimeError, UserInputError
from modelpress.serving.auth import check_key, key_from_headers
from modelpress.serving.batching import request_timing
from modelpress.serving.config import ModelConfig, ServerConfig
from modelpress.serving.extensions import RequestObserver, ServerExtension
from modelpress.serving.http import ServingMiddleware, error_response, info_of, protocol_of
from modelpress.serving.metrics import Metrics
from modelpress.serving.repository import LoadedVersion, ModelRepository
from modelpress.serving.routing import Mirror, RequestContext

log = logging.getLogger("modelpress.serving")
THREAD_START_TIMEOUT_S = 600.0  # in_thread(): loading and warming up every configured model must end within this


class ModelServer:
    """Loaded models (a :class:`ModelRepository`), their metrics, and the ASGI app serving them."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        extensions: Sequence[ServerExtension] = (),
        repository: Callable[[ServerConfig, Metrics], ModelRepository] = ModelRepository,
    ) -> None:
        self.config = config or ServerConfig()
        self.metrics = Metrics()
        # repository: what makes the repository (the Ray backend's deploys each version to Ray Serve)
        self.repository = repository(self.config, self.metrics)
        self.mirror = Mirror()  # runs the shadow copies a policy asks for; extensions observe them
        self.request_observers: list[RequestObserver] = []  # told of every answered or failed request
        self.extensions: dict[str, ServerExtension] = {}
        self.started = False
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop the models run on, once started
        self.check_host = False  # set when served on a loopback address: the Host header must name it (DNS rebinding)
        self.answering = 0  # requests being answered now (GuardMiddleware: at most config.max_concurrent_requests)
        self._key: str | None = self.config.api_key
        self.large_body_gate = asyncio.Semaphore(1)  # large infer bodies are parsed one at a time (kserve_v2.LARGE_BODY_BYTES)
        self.drain_timed_out = False  # set when a SIGTERM drain ran past drain_timeout_s (the process then exits non-zero)
        self.app = create_app(self)
        for extension in extensions:
            self.add_extension(extension)

    def add_extension(self, extension: ServerExtension) -> ServerExtension:
        """Plug ``extension`` in: attach it, include its routes. Only before the server starts."""
        if self.started:
            raise ConfigError(
                f"The server has started; the extension '{extension.name}' cannot be added now.",
                hint="Pass it when building the server: ModelServer(config, extensions=[...]).",
            )
        if extension.name in self.extensions:
            raise ConfigError(f"The server already has an extension named '{extension.name}'.", hint="Add each extension once.")
        self.extensions[extension.name] = extension
        extension.attach(self)
        for router in extension.routers():
            self.app.include_router(router)
        return extension

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm up every configured model (one after another: they share the cores)."""
        if self.started:
            return
        self.started = True
        self.draining = False
        self.loop = asyncio.get_running_loop()
        self.large_body_gate = asyncio.Semaphore(1)  # of this loop
        for cfg in self.config.models:
            await self.repository.load(cfg)
        for extension in self.extensions.values():
            await extension.start()  # e.g. rollouts the registry says were running here pick up where they were

    async def stop(self, timeout: float | None = None) -> None:
        """Report not ready, drain every batcher within ``timeout`` (default: drain_timeout_s), close."""
        self.draining = True
        for extension in self.extensions.values():
            await extension.stop()
        await self.repository.close(self.config.drain_timeout_s if timeout is None else timeout)
        self.started = False

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ModelServer]:
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and self.repository.ready

    # -- what the protocols call -----------------------------------------------------------
    @property
    def api_key(self) -> str:
        """The key management routes need: the configured one, else the one in ``$MODELPRESS_HOME/server.key``
        (generated on first use, mode 0600, logged once)."""
        if self._key is None:
            from modelpress.serving.security import load_or_create_key

            key, created = load_or_create_key()
            if created:  # printed, not logged: --log-level error must not hide the one place the key is shown
                print(
                    f"No API key configured: generated the management key {key} (written to {key_file_path()}, readable by "
                    "this user only; `modelpress rollout ...` on this machine reads it from there).",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                log.info("No API key configured: management routes take the key in %s.", key_file_path())
            self._key = key
        return self._key

    def check_management_key(self, request: Any) -> None:
        check_key(key_from_headers(request.headers), self.api_key, what="management endpoints")

    def check_inference_key(self, request: Any) -> None:
        if self.config.protect_inference:
            check_key(key_from_headers(request.headers), self.api_key, what="inference endpoints")

    async def infer(
        self, model: str, version: str | None, info: Any, decode: Callable[[Any], Any], headers: Any = None
    ) -> tuple[LoadedVersion, list[Any], Any]:
        """Route, decode (with the chosen version's handler), batch and run one request.

        A request routed to a version that was swapped out at that moment is routed again once.
        """
        ctx = RequestContext(info.request_id, info.protocol, headers or {})
        for attempt in (0, 1):
            lv, decision = self.repository.route(model, version, ctx)
            info.model, info.version = lv.name, lv.version
            decoded = await self.run_decode(decode, lv.handler)
            started = time.perf_counter()
            try:
                results, decoded = await lv.infer(decoded=decoded)
            except ModelNotReadyError:
                if attempt or version is not None or lv.batcher.accepting:
                    raise
                continue
            except UserInputError:  # the client's fault, not the version's: not observed
                raise
            except BaseException:
                self._observe(lv, time.perf_counter() - started, False, None)
                raise
            self._observe(lv, time.perf_counter() - started, True, info.request_id)
            if decision.mirrors:  # shadow copies run in background tasks: the client does not wait
                self.mirror.send(self.repository.routers[model], decision, decode, lv, results)
            return lv, results, decoded
        raise AssertionError("unreachable")  # pragma: no cover

    async def run_decode(self, decode: Callable[[Any], Any], handler: Any) -> Any:
        """``decode(handler)`` (tokenizing, checking every input) in a worker thread, off the event loop (on the loop it
        measured 0.75x the throughput at concurrency 64: docs/serving-performance.md)."""
        timing = request_timing.get()
        if timing is None:
            return await asyncio.to_thread(decode, handler)
        started = time.perf_counter()
        decoded = await asyncio.to_thread(decode, handler)
        timing["decode"] = time.perf_counter() - started
        return decoded

    def _observe(self, lv: LoadedVersion, seconds: float, ok: bool, request_id: str | None) -> None:
        for observer in self.request_observers:
            observer(lv.name, lv.version, seconds, ok, request_id)

    def repository_index(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.repository.names():
            router = self.repository.routers[name]
            for label, lv in sorted(router.versions.items()):
                state = "READY" if lv.batcher.accepting else "UNAVAILABLE"
                rows.append({"name": name, "version": label, "state": state, "reason": "" if state == "READY" else "draining"})
        known = set(self.repository.names())
        for name, why in self.repository.failed.items():
            if name not in known:
                rows.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": why})
        for cfg in self.config.models:
            if cfg.name and cfg.name not in known and cfg.name not in self.repository.failed:
                rows.append({"name": cfg.name, "version": "", "state": "UNAVAILABLE", "reason": "not loaded"})
        return rows

    # -- running ---------------------------------------------------------------------------
    def run(self) -> None:
        """Serve on ``config.host:config.port`` until SIGINT / SIGTERM (then drain and exit)."""
        serve(self.config, server=self)

    @contextlib.contextmanager
    def in_thread(self, port: int = 0) -> Iterator[BackgroundServer]:
        """Serve on 127.0.0.1 (a free port by default) in a background thread.

        For tests, notebooks and benchmarks: yields a :class:`BackgroundServer` (``.url``,
        ``.stop()``); leaving the block stops it the way SIGTERM does (drain, then exit).
        """
        uv = _uvicorn_server(self, self.config.model_copy(update={"host": "127.0.0.1", "port": port}), lifespan="on")
        thread = threading.Thread(target=uv.run, name="modelpress-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + THREAD_START_TIMEOUT_S
        while not uv.started:
            if not thread.is_alive():
                raise ModelpressRuntimeError("The server thread stopped during startup.", hint="Read the log above for the error.")
            if time.monotonic() > deadline:
                uv.should_exit = True
                raise ModelpressRuntimeError(
                    f"The server did not start within {THREAD_START_TIMEOUT_S:.0f} s.", hint="Check the models load (see the log above)."
                )
            thread.join(0.02)
        running = BackgroundServer(
            f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}", uv, thread, self.config.drain_timeout_s + 10
        )
        try:
            yield running
        finally:
            running.stop()


class BackgroundServer:
    """A server running in a thread: its base URL, and ``stop()`` (what SIGTERM does: drain, exit)."""

    def __init__(self, url: str, uv: Any, thread: threading.Thread, join_s: float) -> None:
        self.url = url
        self._uv, self.thread, self._join_s = uv, thread, join_s

    def stop(self, wait: bool = True) -> None:
        self._uv.should_exit = True
        if wait:
            self.thread.join(self._join_s)


def create_app(server: ModelServer) -> Any:
    """The FastAPI app of ``server`` (OpenAPI docs at /docs); its lifespan starts and stops the server."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from modelpress.serving.http import error_body, modelpress_version
    from modelpress.serving.protocols import kserve_v2, openai, openai_llm, sagemaker

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        await server.start()  # a no-op when serve() loaded the models already
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(
        title="modelpress",
        version=modelpress_version(),
        summary="KServe v2, OpenAI-compatible and SageMaker endpoints over dynamically batched models.",
        lifespan=lifespan,
    )
    app.state.server = server
    app.include_router(kserve_v2.router)
    app.include_router(openai.router)
    app.include_router(openai_llm.router)  # completions and chat of the served causal LMs
    app.include_router(sagemaker.router)

    @app.get("/metrics", tags=["Observability"], summary="Prometheus metrics")
    async def metrics() -> Response:
        body, ctype = server.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v2/models", tags=["KServe v2"], summary="Served models and versions (not in the spec; handy)")
    async def list_models() -> Response:
        from modelpress.serving.http import json_response

        return json_response([v.describe() for v in server.repository.versions()])

    @app.exception_handler(ModelpressError)
    async def modelpress_error(request: Request, exc: ModelpressError) -> Response:
        return error_response(exc, info_of(request).protocol)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        headers = getattr(exc, "headers", None)
        return Response(
            error_body(protocol_of(request.url.path), exc.status_code, str(exc.detail)),
            exc.status_code,
            headers=headers,
            media_type="application/json",
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        # where and what, for the first few problems; never the input itself (an 8 MiB body's repr is tens of MB)
        errors = exc.errors()
        parts = [f"{_where(tuple(e.get('loc', ())))}: {e.get('msg', '')}" for e in errors[:3]]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        message = f"Invalid request: {'; '.join(parts)}{more}."
        return Response(error_body(protocol_of(request.url.path), 400, message), 400, media_type="application/json")

    from modelpress.serving.security import GuardMiddleware

    app.add_middleware(GuardMiddleware, server=server)  # inside the serving middleware: its errors get request ids and metrics
    app.add_middleware(
        ServingMiddleware,
        metrics=server.metrics,
        max_body_bytes=server.config.max_body_bytes,
        access_log_enabled=server.config.access_log,
        body_timeout_s=server.config.body_timeout_s,
        server_timing=server.config.server_timing,
    )
    return app


def _where(loc: tuple[Any, ...]) -> str:
    """``body field 'messages.0.role'`` for pydantic's ``('body', 'messages', 0, 'role')``."""
    if not loc:
        return "body"
    field = ".".join(str(p) for p in loc[1:])
    return f"{loc[0]} field '{field}'" if field else str(loc[0])


def _uvicorn_server(server: ModelServer, cfg: ServerConfig, *, lifespan: Literal["auto", "on", "off"]) -> Any:
    import importlib.util

    import uvicorn

    from modelpress.serving.security import is_loopback

    server.check_host = is_loopback(cfg.host)

    class _DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            server.draining = True  # readiness answers 503 from now on
            await super().shutdown(sockets)

        async def _wait_tasks_to_complete(self) -> None:
            # uvicorn cancels this wait when timeout_graceful_shutdown (drain_timeout_s) passes, then cancels the requests
            try:
                await super()._wait_tasks_to_complete()
            except asyncio.CancelledError:
                server.drain_timed_out = True
                log.error("The drain ran past drain_timeout_s (%s s): requests still running were cancelled.", cfg.drain_timeout_s)
                raise

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises SIGTERM / SIGINT once it has shut down, so the process would end with -15 after a
            # complete drain; a drained server exits 0 instead (the signal was the request to stop, and it was done).
            # A drain that ran past drain_timeout_s (requests cancelled) keeps the re-raise: the process ends by the
            # signal (status -15, 143 in a shell), so a supervisor sees that requests were lost.
            with super().capture_signals():
                yield
                if not server.drain_timed_out and not self.force_exit:
                    self._captured_signals.clear()

    config = uvicorn.Config(
        server.app,
        host=cfg.host,
        port=cfg.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan=lifespan,
        log_level=cfg.log_level,
        access_log=False,  # the middleware writes a structured access log instead
        timeout_graceful_shutdown=cfg.drain_timeout_s,  # type: ignore[arg-type]  # uvicorn takes any number of seconds
        backlog=2048,
    )
    return _DrainingServer(config)


def serve(config: ServerConfig, *, server: ModelServer | None = None) -> None:
    """Load every model, then serve until SIGINT / SIGTERM; in-flight requests finish before exit.

    Models are loaded before the socket opens, so a model that fails to load stops here with
    its error (no half-started server).
    """
    check_bind(config)
    logging.basicConfig(level=getattr(logging, config.log_level.upper()), format="%(message)s")
    prepare_process()
    server = server or ModelServer(config)
    uv = _uvicorn_server(server, config, lifespan="on")
    server.api_key  # noqa: B018 - resolve (and, when none is configured, generate and log) the management key before serving

    async def main() -> None:
        await server.start()
        names = ", ".join(server.repository.names()) or "none"
        log.info("modelpress serving %s on http://%s:%d (docs at /docs, metrics at /metrics)", names, config.host, config.port)
        await uv.serve()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(main())


# The server process's OpenMP settings, set before torch (and its libgomp) is first imported, unless the environment
# sets them: threads that finish their share of an operator sleep instead of spinning. libgomp's default spins up to
# ~300k rounds at every barrier; in a server the event loop, the tokenizer and the client compete with the model's
# threads for the cores, and a spinning thread burns the core that the thread it waits for (or the event loop) needs.
# Measured in docs/serving-performance.md.
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def prepare_process() -> None:
    """Set :data:`OPENMP_ENV` for this process (what ``serve`` does first); each variable the environment sets wins.

    Libraries read these when they are loaded: after torch was imported the call changes nothing (and says so)."""
    if "torch" in sys.modules:
        log.info("torch was imported before the server started: OpenMP keeps its settings (%s not applied)", OPENMP_ENV)
        return
    for key, value in OPENMP_ENV.items():
        os.environ.setdefault(key, value)


def check_bind(config: ServerConfig) -> None:
    """Refuse to listen on a non-loopback address without a configured key (a generated one is for local clients)."""
    from modelpress.serving.security import is_loopback

    if not is_loopback(config.host) and not config.api_key:
        raise ConfigError(
            f"Listening on {config.host} makes the server reachable from other machines, and no API key is set.",
            hint='Set one: modelpress serve ... --host 0.0.0.0 --api-key "$(openssl rand -hex 16)" (or MODELPRESS_API_KEY), '
            "or listen on 127.0.0.1 (the default).",
        )


def key_file_path() -> str:
    from modelpress.serving.security import key_file

    return str(key_file())


__all__ = ["ModelConfig", "ModelServer", "ServerConfig", "check_bind", "create_app", "serve"]
