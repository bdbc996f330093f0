"""What the server has loaded: one :class:`Router` per model name over its :class:`LoadedVersion` s.

Loading resolves a source (a folder, a short name, or a registry reference such as
``NAME@production`` or ``NAME:3``), creates the runner, warms it up and starts its batcher, all
in a worker thread so traffic keeps flowing; only then does the version join its router. A load
that makes the new version the default is a hot swap: the policy switches in one step, and
the versions it replaced drain (finish what they queued) before they close, so no request fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress._fs import crash_point
from modelpress.errors import ConfigError, ModelNotFoundError, ModelNotReadyError, UnknownServedModelError
from modelpress.serving.batching import Batcher
from modelpress.serving.config import ModelConfig, ServerConfig, validated
from modelpress.serving.handlers import Handler, handler_for
from modelpress.serving.metrics import Metrics
from modelpress.serving.routing import Decision, RequestContext, Router, SinglePolicy

log = logging.getLogger("modelpress.serving")

WARMUP_SIZES = (1, 8)  # batch sizes run once before a version reports ready
MAX_FAILED = 256  # names whose last load failed that the repository remembers (the oldest is forgotten first)
MAX_KNOWN = 256  # configs of names loaded before, for a reload by name (the oldest not served now is forgotten first)


@dataclass
class LoadedVersion:
    """One version of a model, loaded and batching: its handler (task + runner) and its batcher."""

    name: str
    version: str
    handler: Handler
    batcher: Batcher
    config: ModelConfig
    artifact: Any = None
    load_seconds: float = 0.0
    loaded_at: float = field(default_factory=time.time)
    registry_ref: str | None = None
    inflight: int = 0

    @property
    def task(self) -> str:
        return self.handler.task_name

    @property
    def runtime(self) -> str:
        return getattr(self.handler.runner, "name", self.config.runtime or "torch")

    async def infer(self, inputs: Any = None, *, decoded: Any = None) -> tuple[list[Any], Any]:
        """Results for one request's task inputs (or already decoded rows), and the decoded rows."""
        self.inflight += 1
        try:
            if decoded is None:
                decoded = self.handler.decode(inputs)
            results = await self.batcher.infer(decoded.rows, decoded.lengths)
            return results, decoded
        finally:
            self.inflight -= 1

    @property
    def public_source(self) -> str:
        """Where the version came from, as clients may see it: the registry ref, else the folder's or short name's last
        part (never the server's filesystem path)."""
        if self.registry_ref:
            return self.registry_ref
        return Path(self.config.source).name or self.config.source

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "runtime": self.runtime,
            "source": self.public_source,
            "registry_ref": self.registry_ref,
            "load_seconds": round(self.load_seconds, 3),
            "batching": self.config.batching.model_dump(),
        }


def resolve_source(cfg: ModelConfig, registry: str | None) -> tuple[Any, str, str, str | None]:
    """(artifact, default name, default version label, registry ref or None) for a source."""
    from modelpress.sources import load

    spec = cfg.source
    path = Path(spec).expanduser()
    looks_like_ref = ("@" in spec or ":" in spec) and not path.exists()
    if not looks_like_ref:
        try:
            art = load(spec, cfg.task)
            return art, art.name, "1", None
        except ModelNotFoundError:
            if path.exists() or "/" in spec:
                raise
    from modelpress.registry.api import Registry

    with Registry(registry) as reg:
        mv = reg.get(spec)
        return mv.artifact(), mv.name, str(mv.version), mv.ref


def build_version(
    cfg: ModelConfig, server: ServerConfig, metrics: Metrics | None = None, *, runner: Any = None, artifact: Any = None
) -> LoadedVersion:
    """Load, warm up and wrap one model version (blocking: call it in a worker thread).

    ``runner`` / ``artifact``: use these instead of resolving ``cfg.source`` (tests wrap a runner
    to watch the batches it gets).
    """
    from modelpress.registry.names import validate_name
    from modelpress.runtimes import create_runner, default_threads
    from modelpress.tasks import task_for

    t0 = time.perf_counter()
    ref = None
    if artifact is None:
        artifact, name, version, ref = resolve_source(cfg, server.registry)
    else:
        name, version = artifact.name, "1"
    name = validate_name(cfg.name or name)
    version = cfg.version or version
    crash_point(f"version-loading:{name}:{version}")  # fault runs: a version's runner about to load (in this worker thread)
    task = task_for(artifact)
    if task.name == "causal-lm" and runner is None:  # a generation engine batches its sequences itself
        from modelpress.serving.llm import build_generation

        handler, engine_batcher = build_generation(cfg, artifact, task, name, version, metrics)
        return LoadedVersion(
            name,
            version,
            handler,
            engine_batcher,  # the engine's batcher answers what the repository asks of a Batcher
            cfg.model_copy(update={"name": name, "version": version}),
            artifact,
            time.perf_counter() - t0,
            registry_ref=ref,
        )
    if runner is None:
        threads = cfg.threads or max(1, default_threads() // cfg.batching.instances)
        runner = create_runner(artifact, cfg.runtime, threads=threads, **cfg.runtime_options)
        if not runner.parallel_calls and cfg.batching.instances > 1 and "instances" not in cfg.batching.model_fields_set:
            # the artifact's manifest named a runtime that runs one call at a time (a tuned OpenVINO variant): the
            # config's check (SERIAL_RUNTIMES) could not see it, so one instance with every core, as for runtime: openvino
            cfg = cfg.model_copy(update={"batching": cfg.batching.model_copy(update={"instances": 1})})
            runner = create_runner(artifact, cfg.runtime, threads=cfg.threads or default_threads(), **cfg.runtime_options)
    runner.load()
    handler = handler_for(task, runner, cfg)
    if cfg.warmup:
        for n in WARMUP_SIZES:
            handler.work(handler.decode(handler.sample(min(n, cfg.batching.max_batch_size))).rows)
    seconds = time.perf_counter() - t0
    observer = metrics.batch_observer(name, version) if metrics is not None else None
    batcher = Batcher(handler.work, cfg.batching, name=f"{name}:{version}", observer=observer)
    return LoadedVersion(
        name, version, handler, batcher, cfg.model_copy(update={"name": name, "version": version}), artifact, seconds, registry_ref=ref
    )


class ModelRepository:
    """Routers by model name, plus the configs the server knows (for load-by-name)."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.routers: dict[str, Router[LoadedVersion]] = {}
        self.known: dict[str, ModelConfig] = {}  # name -> the config it was last loaded with (at most MAX_KNOWN, oldest dropped)
        self.failed: dict[str, str] = {}  # name -> why its last load failed (at most MAX_FAILED names, oldest dropped)
        self._locks: dict[str, asyncio.Lock] = {}  # name -> its load lock, only while a load or unload of it runs
        self._lock_users: dict[str, int] = {}  # name -> tasks holding or waiting for its lock

    # -- routing ---------------------------------------------------------------------------
    def route(self, name: str, version: str | None = None, ctx: RequestContext | None = None) -> tuple[LoadedVersion, Decision]:
        router = self.routers.get(name)
        if router is None:
            raise UnknownServedModelError(
                f"No model named '{name}' is served here.", hint=f"Served models: {', '.join(sorted(self.routers)) or 'none'}."
            )
        return router.route(ctx or RequestContext(), version)

    def check_served(self, name: str, version: str | None = None) -> None:
        """404 (:class:`UnknownServedModelError`) unless ``name`` (and ``version``, when given) is served; no routing
        decision is made. Inference routes call it before they read a body, so an unknown name costs nothing."""
        router = self.routers.get(name)
        if router is None:
            self.route(name)  # raises the 404 with the served names
        elif version and version not in router.versions:
            raise UnknownServedModelError(f"Model '{name}' has no version '{version}' loaded.", hint=router.versions_hint())

    def get(self, name: str, version: str | None = None) -> LoadedVersion:
        return self.route(name, version)[0]

    def names(self) -> list[str]:
        return sorted(self.routers)

    def versions(self) -> list[LoadedVersion]:
        return [v for name in self.names() for _, v in sorted(self.routers[name].versions.items())]

    @property
    def ready(self) -> bool:
        return bool(self.routers) and all(r.policy is not None for r in self.routers.values())

    # -- loading ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lock(self, name: str) -> AsyncIterator[None]:
        """The per-name lock; its entry is removed once nobody holds or waits for it (the map holds only names in use)."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        self._lock_users[name] = self._lock_users.get(name, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[name] -= 1
            if not self._lock_users[name]:
                del self._lock_users[name]
                self._locks.pop(name, None)

    def _remember_config(self, name: str, config: ModelConfig) -> None:
        self.known.pop(name, None)
        self.known[name] = config
        if len(self.known) > MAX_KNOWN:
            for old in [n for n in self.known if n not in self.routers][: len(self.known) - MAX_KNOWN]:
                del self.known[old]

    def _remember_failure(self, name: str, why: str) -> None:
        self.failed.pop(name, None)
        self.failed[name] = why
        while len(self.failed) > MAX_FAILED:
            self.failed.pop(next(iter(self.failed)))

    def is_expected(self, name: str) -> bool:
        """True for a name the server is configured with or has loaded (its readiness is 503, not 404, while it is down)."""
        return name in self.routers or name in self.known or any(m.name == name for m in self.config.models)

    def check_load_source(self, source: str) -> None:
        """Refuse (403) a load source a management client may not choose: only registry references, the sources the server
        was configured or loaded with, and folders under ``allow_load_from`` are taken (a short name would train a model)."""
        from modelpress.errors import ForbiddenError, InvalidReferenceError
        from modelpress.registry.names import parse_ref

        if ("@" in source or ":" in source) and "/" not in source and "\\" not in source:
            try:
                parse_ref(source)
                return
            except InvalidReferenceError:
                pass
        if source in {m.source for m in self.config.models} or source in {c.source for c in self.known.values()}:
            return
        path = Path(source).expanduser()
        if path.is_absolute():
            resolved = path.resolve()
            for root in self.config.allow_load_from:
                if resolved.is_relative_to(Path(root).expanduser().resolve()):
                    return
        raise ForbiddenError(
            "This server loads registry references (NAME@production, NAME:3) and the sources it was started with; "
            "other sources are refused.",
            hint="Register the model (modelpress registry register ...) and load NAME:VERSION, or start the server with "
            "--allow-load-from DIR to allow absolute paths of folders under DIR.",
        )

    def check_room_for(self, name: str) -> None:
        """Refuse (403) loading one more model name than ``max_models``."""
        from modelpress.errors import ForbiddenError

        if name not in self.routers and len(self.routers) >= self.config.max_models:
            raise ForbiddenError(
                f"This server serves {len(self.routers)} models, as many as it allows (max_models).",
                hint="Unload one first, or raise max_models in the server config.",
            )

    async def load(
        self, cfg: ModelConfig, *, make_default: bool = True, retire_previous: bool = True, runner: Any = None, artifact: Any = None
    ) -> LoadedVersion:
        """Load ``cfg`` as a new version (in a worker thread) and, with ``make_default``, switch to it.

        With ``retire_previous`` the versions that no longer get traffic drain and close.
        Loading the version label that is already the default again reloads it (a new runner,
        then the swap), like Triton's reload.
        """
        key = cfg.name or cfg.source
        async with self._lock(key):
            try:
                loaded = await self.build(cfg, runner=runner, artifact=artifact)
            except Exception as exc:
                if cfg.name:
                    self._remember_failure(cfg.name, str(getattr(exc, "message", exc)))
                raise
        async with self._lock(loaded.name):
            return await self._install(loaded, make_default=make_default, retire_previous=retire_previous)

    async def build(self, cfg: ModelConfig, *, runner: Any = None, artifact: Any = None) -> LoadedVersion:
        """Make the version ``load`` installs: here, the runner and handler in this process (in a
        worker thread). The extension point of repositories whose versions live elsewhere (Ray
        Serve deployments: :mod:`modelpress.scaleout.ray_versions`)."""
        return await asyncio.to_thread(build_version, cfg, self.config, self.metrics, runner=runner, artifact=artifact)

    async def _install(self, new: LoadedVersion, *, make_default: bool, retire_previous: bool) -> LoadedVersion:
        router = self.routers.get(new.name)
        if router is None:
            router = Router(new.name)
        new.batcher.start()
        self.metrics.track_version(
            new.name, new.version, inflight=lambda: new.inflight, depth=lambda: new.batcher.depth, load_seconds=new.load_seconds
        )
        if make_default and new.name in self.routers:
            crash_point(f"hot-swap:{new.name}:{new.version}")  # fault runs: the new version loaded and warm, traffic not switched yet
        replaced = router.versions.get(new.version)
        router.versions[new.version] = new  # a reload of the same label replaces it in place
        if make_default or router.policy is None:
            router.set_policy(SinglePolicy(new.version))
        self.routers[new.name] = router
        self._remember_config(new.name, new.config)
        self.failed.pop(new.name, None)
        log.info("loaded %s:%s (%s on %s) in %.2f s", new.name, new.version, new.task, new.runtime, new.load_seconds)
        retired = [replaced] if replaced is not None and replaced is not new else []
        if retire_previous and router.policy is not None:
            keep = router.policy.targets()
            for label in [v for v in router.versions if v not in keep]:
                retired.append(router.versions.pop(label))
        for old in retired:
            await self._retire(old)
        return new

    async def _retire(self, old: LoadedVersion) -> None:
        await old.batcher.drain(old.config.batching.timeout_s)
        if not any(v is old for r in self.routers.values() for v in r.versions.values()):
            self.metrics.forget_version(old.name, old.version)
        close = getattr(old.handler.runner, "close", None)
        if close is not None:
            close()
        log.info("unloaded %s:%s", old.name, old.version)

    async def unload(self, name: str, version: str | None = None) -> list[str]:
        """Unload one version (not the one traffic goes to) or the whole model; returns what was unloaded."""
        router = self.routers.get(name)
        if router is None:
            raise UnknownServedModelError(f"No model named '{name}' is loaded.", hint=f"Loaded: {', '.join(self.names()) or 'none'}.")
        async with self._lock(name):
            if version is not None:
                gone = [router.remove(version)]
            else:
                gone = list(router.versions.values())
                del self.routers[name]
            for old in gone:
                await self._retire(old)
        return [f"{v.name}:{v.version}" for v in gone]

    def config_for(self, name: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
        """The config to load ``name`` with: the known one (or ``NAME@production`` from the registry), updated.

        A new load gets the source's version unless told; a new source runs on the runtime its
        own manifest records unless ``overrides`` name one (another version of a model may be an
        ONNX or OpenVINO variant of a torch original).
        """
        overrides = dict(overrides or {})
        base = self.known.get(name) or next((m for m in self.config.models if m.name == name), None)
        data: dict[str, Any] = base.model_dump(exclude={"version"}) if base is not None else {}
        if "source" in overrides and overrides["source"] != data.get("source") and "runtime" not in overrides:
            data.pop("runtime", None)
            data.pop("runtime_options", None)
        data.update(overrides)
        if "source" not in data:
            if self.config.registry is None and not registry_exists():
                raise ConfigError(
                    f"The server does not know where to load '{name}' from.",
                    hint='Pass its source: {"parameters": {"config": "{\\"source\\": \\"path/or/NAME@production\\"}"}} '
                    "(tritonclient: load_model(name, config=...)).",
                )
            data["source"] = f"{name}@production"
        data["name"] = name
        return validated(ModelConfig, data, f"the load request for '{name}'")

    async def close(self, timeout: float | None = None) -> None:
        """Drain every version (within ``timeout`` in all) and close them."""
        versions = self.versions()
        self.routers.clear()
        results = await asyncio.gather(*(v.batcher.drain(timeout) for v in versions), return_exceptions=True)
        for v, res in zip(versions, results, strict=True):
            if res is not True:
                log.warning("%s:%s did not drain in time (%r)", v.name, v.version, res)
            close = getattr(v.handler.runner, "close", None)
            if close is not None:
                close()

    def not_ready_error(self, name: str) -> ModelNotReadyError:
        why = self.failed.get(name)
        return ModelNotReadyError(
            f"Model '{name}' is not ready" + (": its last load failed (the server log has why)." if why else "."), hint="Load it again."
        )


def registry_exists() -> bool:
    from modelpress.locations import home_dir

    return (home_dir() / "registry.db").is_file()
