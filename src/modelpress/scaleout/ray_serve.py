"""The model server on Ray Serve: the same models, batching, protocols and traffic policies, scaled out.

    from modelpress.scaleout import ray_serve
    from modelpress.serving.config import ServerConfig
    service = ray_serve.deploy(ServerConfig.from_models(["minilm"]), ray_serve.RayOptions(max_replicas=4))
    print(service.url)          # KServe v2, OpenAI and SageMaker routes, the rollout API, /metrics
    service.shutdown()

    modelpress serve minilm --backend ray --min-replicas 1 --max-replicas 4      # the same, until Ctrl-C

What maps to what:

* the server (protocol codecs, auth, limits, the request metrics, the :class:`~modelpress.serving.routing.Router`
  of each model with its traffic policy, the shadow mirror, the rollout controller and its API) is
  the **ingress**: one Ray Serve application (``app_name``, at ``/``) whose replica runs the
  server's own FastAPI app over a :class:`~modelpress.scaleout.ray_versions.RayRepository`;
* every **model version** is a Ray Serve application of its own with one deployment
  (:class:`~modelpress.scaleout.ray_versions.ModelReplica`), whose replicas load the model with the
  server's code and batch with its :class:`~modelpress.serving.config.BatchConfig`; Ray's autoscaler
  scales them between ``min_replicas`` and ``max_replicas`` on ``target_ongoing_requests``;
* a rollout's candidate is deployed when the rollout loads it, and its application deleted when
  the rollout retires a version.

Ray is an optional dependency: ``pip install 'modelpress[ray]'``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelpress.errors import ConfigError, ModelpressRuntimeError, require
from modelpress.serving.config import ModelConfig, ServerConfig, validated

log = logging.getLogger("modelpress.scaleout")

BACKENDS = ("local", "ray")  # what `modelpress serve --backend` takes
RAY_OPTIONS_EXAMPLE = "RayOptions(min_replicas=1, max_replicas=4, target_ongoing_requests=2, downscale_delay_s=60)"
# Requests one replica takes at once (Ray's max_ongoing_requests) when not given: a batch running on every worker thread
# and one more forming, so the replica's batcher sees enough requests to fill its batches.
BATCHES_IN_FLIGHT_PER_INSTANCE = 2
# Ray tries a replica's constructor this many times before a deployment fails (Ray's default is 20): loading a model fails
# the same way each time (a wrong path, a runtime that cannot load it), and each try loads the model again. Counted only
# until a replica has started: later failures (a node lost) are restarted as usual.
CONSTRUCTOR_TRIES = 2


class RayOptions(BaseModel):
    """Where to deploy and how the model versions scale (the ingress runs one replica).

    ``autoscaling``: further keys of Ray's ``AutoscalingConfig`` (``look_back_period_s``,
    ``metrics_interval_s``, ``upscaling_factor``, ...), checked by Ray when deploying.
    """

    model_config = ConfigDict(extra="forbid")
    address: str | None = None  # a running cluster ("auto", "HOST:6379", "ray://HOST:10001"); None: RAY_ADDRESS, else a new local one
    min_replicas: int = Field(1, ge=0, le=10_000)  # 0: scale to zero when idle (the next request waits for a replica to load)
    max_replicas: int = Field(1, ge=1, le=10_000)
    initial_replicas: int | None = Field(None, ge=0, le=10_000)
    target_ongoing_requests: float = Field(2.0, gt=0.0, le=1_000_000.0)  # Ray's default
    downscale_delay_s: float = Field(600.0, ge=0.0, le=86_400.0)  # Ray's default
    upscale_delay_s: float = Field(30.0, ge=0.0, le=86_400.0)  # Ray's default
    max_ongoing_requests: int | None = Field(None, ge=1, le=1_000_000)  # per replica; None: see BATCHES_IN_FLIGHT_PER_INSTANCE
    autoscaling: dict[str, Any] = Field(default_factory=dict)
    replica_cpus: float = Field(1.0, ge=0.0, le=1024.0)  # Ray CPUs each model replica reserves (and its runner's threads)
    ingress_cpus: float = Field(1.0, ge=0.0, le=1024.0)  # ... the ingress (decoding, routing, the protocols)
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "EveryNode"  # where Ray runs HTTP proxies
    app_name: str = Field("modelpress", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    @model_validator(mode="after")
    def _check_range(self) -> RayOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie between min_replicas and max_replicas")
        fixed = {"min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests", "downscale_delay_s", "upscale_delay_s"}
        if fixed & set(self.autoscaling):
            raise ValueError(f"autoscaling repeats {sorted(fixed & set(self.autoscaling))}: set them as options of their own")
        return self

    @property
    def replica_threads(self) -> int:
        """Runner threads per replica when the model config names none: the CPUs it reserves (at least one)."""
        return max(1, int(self.replica_cpus))

    def autoscaling_config(self) -> dict[str, Any] | None:
        """Ray's ``autoscaling_config``; None when the replicas are fixed (min = max, nothing else asked)."""
        if self.min_replicas == self.max_replicas and not self.autoscaling:
            return None
        out: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "downscale_delay_s": self.downscale_delay_s,
            "upscale_delay_s": self.upscale_delay_s,
            **self.autoscaling,
        }
        if self.initial_replicas is not None:
            out["initial_replicas"] = self.initial_replicas
        return out

    def replica_deployment_options(self, model: ModelConfig) -> dict[str, Any]:
        """``serve.deployment`` options of one model version's deployment."""
        batching = model.batching
        ongoing = self.max_ongoing_requests or batching.max_batch_size * batching.instances * BATCHES_IN_FLIGHT_PER_INSTANCE
        out: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.replica_cpus},
            "max_ongoing_requests": ongoing,
            "max_queued_requests": batching.max_queue_size,  # requests waiting for a replica beyond this answer 429
            "graceful_shutdown_timeout_s": batching.timeout_s,
            "max_constructor_retry_count": CONSTRUCTOR_TRIES,
        }
        scaling = self.autoscaling_config()
        if scaling is None:
            out["num_replicas"] = self.min_replicas
        else:
            out["autoscaling_config"] = scaling
        return out


def ray_options(path: str | os.PathLike | None = None, **values: Any) -> RayOptions:
    """:class:`RayOptions` from a YAML or JSON file (``path``) and keyword values over it (None: not given).

    A file or value that is wrong is a :class:`ConfigError` naming what is wrong.
    """
    data: dict[str, Any] = {}
    where = "the Ray Serve options"
    if path is not None:
        data = _read_mapping(Path(path))
        where = f"{where} ({path} and the flags)"
    data.update({k: v for k, v in values.items() if v is not None})
    return validated(RayOptions, data, where, what="replica settings", example=RAY_OPTIONS_EXAMPLE)


def _read_mapping(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(
            f"The Ray options file '{path}' does not exist.", hint="Example: modelpress serve minilm --backend ray --ray-options ray.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"The Ray options file '{path}' could not be parsed: {exc}", hint="Check the syntax (indentation, colons)."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"The Ray options file '{path}' must hold a mapping.", hint="Example: {max_replicas: 4, proxy_location: HeadOnly}"
        )
    return data


def check_backend(backend: str) -> str:
    """``backend`` if it is one ``modelpress serve`` knows, else a :class:`ConfigError` listing them."""
    if backend not in BACKENDS:
        raise ConfigError(
            f"'{backend}' is not a serving backend.", hint=f"Use one of {', '.join(BACKENDS)}, e.g. modelpress serve minilm --backend ray"
        )
    return backend


# -- the ingress ----------------------------------------------------------------------------
class Ingress:
    """The ingress deployment's class: the model server (with rollouts) over a :class:`RayRepository`.

    The constructor deploys and routes every model (``server.start``), so a model that fails to
    load fails the replica with its own error, which Ray reports in the application's status; the
    app's lifespan then finds the server started, and stops it when the replica stops.
    """

    async def __init__(self, server_json: str, options_json: str) -> None:  # type: ignore[misc]  # Ray awaits an async constructor
        from modelpress.rollout.extension import with_rollouts
        from modelpress.scaleout.ray_versions import RayRepository, ReplicaHeaderMiddleware
        from modelpress.serving.app import ModelServer
        from modelpress.serving.security import is_loopback

        config = ServerConfig.model_validate_json(server_json)
        options = RayOptions.model_validate_json(options_json)
        logging.basicConfig(level=getattr(logging, config.log_level.upper()), format="%(message)s")
        server = ModelServer(config, repository=lambda cfg, metrics: RayRepository(cfg, metrics, options))
        server.check_host = is_loopback(config.host)  # as `modelpress serve` does: on loopback, Host must name it
        with_rollouts(server)
        server.app.add_middleware(ReplicaHeaderMiddleware)
        self.server = server
        await server.start()

    def __serve_build_asgi_app__(self) -> Any:
        """The server's FastAPI app (Ray runs its lifespan: the start is a no-op by then; the stop drains)."""
        return self.server.app


# -- deploying ------------------------------------------------------------------------------
class RayService:
    """A deployed server: its ``url``, the Ray Serve application names, and ``shutdown()``."""

    def __init__(self, url: str, app_name: str, *, started_ray: bool) -> None:
        self.url = url
        self.app_name = app_name
        self.started_ray = started_ray

    def applications(self) -> list[str]:
        """The Ray Serve applications of this service: the ingress and one per model version (those being deleted left out)."""
        from ray import serve

        apps = serve.status().applications
        ours = [name for name in apps if name == self.app_name or name.startswith(f"{self.app_name}.")]
        return [name for name in ours if apps[name].status != "DELETING"]

    def shutdown(self) -> None:
        """Delete the ingress and every version's application; stop Ray when :func:`deploy` started it."""
        import ray
        from ray import serve

        if self.started_ray:
            serve.shutdown()
            ray.shutdown()
            return
        serve.delete(self.app_name)  # the ingress first: no request reaches a version being deleted
        for name in self.applications():
            serve.delete(name)

    def __enter__(self) -> RayService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def deploy(config: ServerConfig, options: RayOptions | None = None) -> RayService:
    """Deploy ``config`` on Ray Serve and return once every model is loaded on its replicas.

    The HTTP proxies listen on ``config.host:config.port``. Connects to ``options.address``
    (or ``RAY_ADDRESS``), else starts a local Ray; the model sources must be readable on every
    node (the same paths, or registry references on a shared registry).
    """
    options = options or RayOptions()
    _check(config)
    return _deploy(config, options, started_ray=_connect(options))


def _check(config: ServerConfig) -> None:
    from modelpress.serving.app import check_bind

    if not config.models:
        raise ConfigError("No model to serve.", hint="Example: ServerConfig.from_models(['minilm'])")
    check_bind(config)
    require("ray", "ray")


def _connect(options: RayOptions) -> bool:
    """Connect to Ray (``options.address``, else RAY_ADDRESS, else a new local Ray); True when this started it."""
    import ray

    if ray.is_initialized():
        return False
    address = options.address or os.environ.get("RAY_ADDRESS") or "local"  # "local": a new Ray in this process
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    return address == "local"


def _deploy(config: ServerConfig, options: RayOptions, *, started_ray: bool) -> RayService:
    from ray import serve

    serve.start(proxy_location=options.proxy_location, http_options={"host": config.host, "port": config.port})
    ingress = serve.deployment(
        name="ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": options.ingress_cpus},
        max_ongoing_requests=config.max_concurrent_requests,
        graceful_shutdown_timeout_s=config.drain_timeout_s,
        max_constructor_retry_count=CONSTRUCTOR_TRIES,
    )(serve.ingress()(Ingress))
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    service = RayService(f"http://{host}:{config.port}", options.app_name, started_ray=started_ray)
    try:
        serve.run(ingress.bind(config.model_dump_json(), options.model_dump_json()), name=options.app_name, route_prefix="/")
    except Exception as exc:
        why = _failure_reason(options.app_name) or str(exc)
        service.shutdown()  # what did deploy goes (or the Ray this started)
        raise ModelpressRuntimeError(
            f"The Ray Serve deployment '{options.app_name}' did not start: {why}",
            hint="The replica logs have the whole story (ray logs, or the Ray dashboard); check the models load with the local backend.",
        ) from exc
    return service


def _failure_reason(app_name: str) -> str | None:
    """The last error line of the ingress's status message (a replica's traceback, as Ray reports it), if any."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
        messages = [app.message, *(d.message for d in app.deployments.values())] if app is not None else []
    except Exception:  # noqa: BLE001  (a status Ray cannot give leaves the error Ray raised)
        return None
    lines = [ln.strip() for m in messages for ln in (m or "").splitlines() if "Error: " in ln and "RuntimeError: Traceback" not in ln]
    useful = [ln for ln in lines if "lifespan startup failed" not in ln]
    return (useful or lines or [None])[-1]


def serve(config: ServerConfig, options: RayOptions | None = None) -> None:
    """Deploy, then wait until SIGINT / SIGTERM and shut the service down (what ``modelpress serve --backend ray`` runs)."""
    options = options or RayOptions()
    _check(config)
    started_ray = _connect(options)
    stop = threading.Event()
    with _signals(stop):  # after connecting: Ray's own SIGTERM handler would end the process before the shutdown
        service = _deploy(config, options, started_ray=started_ray)
        try:
            names = ", ".join(m.name or m.source for m in config.models)
            print(f"modelpress serving {names} on Ray Serve at {service.url} (Ctrl-C to stop)", flush=True)
            stop.wait()
        finally:
            service.shutdown()


@contextlib.contextmanager
def _signals(stop: threading.Event) -> Iterator[None]:
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["BACKENDS", "Ingress", "RayOptions", "RayService", "check_backend", "deploy", "ray_options", "serve"]
