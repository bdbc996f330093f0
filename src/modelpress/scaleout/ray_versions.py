"""Model versions as Ray Serve deployments: the replica that runs one, and the ingress's view of it.

A replica (:class:`ModelReplica`) loads its version exactly as ``modelpress serve`` does
(:func:`modelpress.serving.repository.build_version`: the runner, the task's handler, the warm-up)
and batches what it is sent with the server's own :class:`~modelpress.serving.batching.Batcher`
and the model's :class:`~modelpress.serving.config.BatchConfig`. Ray routes each request to one
replica and scales the replicas on the requests each one has in flight.

The ingress keeps the rest of the server: :class:`RayRepository` is the server's
:class:`~modelpress.serving.repository.ModelRepository` whose versions are deployed to Ray
instead of loaded in the process. Each one is a :class:`~modelpress.serving.repository.LoadedVersion`
with the task's handler (decoding and the protocols' tensors happen in the ingress, as in the
server) and a :class:`RemoteBatcher` that sends the decoded rows to the version's deployment.
Routers, traffic policies, the mirror and the rollout controller see nothing else.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any

from modelpress import errors
from modelpress.errors import ConfigError, ModelNotReadyError, ModelpressError, RequestTimeoutError, ServerOverloadedError
from modelpress.serving.config import BatchConfig, ModelConfig, ServerConfig
from modelpress.serving.metrics import Metrics
from modelpress.serving.repository import LoadedVersion, ModelRepository, resolve_source

log = logging.getLogger("modelpress.scaleout")

# The ingress waits this much longer than the model's timeout_s for a replica's answer: the replica's own batcher
# answers 504 at timeout_s; the margin covers the two hops through Ray (object transfer, a replica starting up).
TRANSPORT_MARGIN_S = 10.0
DRAIN_POLL_S = 0.05
NODE_HEADER = "x-modelpress-node"  # the Ray node id of the replica that answered (a response header)
REPLICA_HEADER = "x-modelpress-replica"  # ... and the replica's id


# -- errors across the Ray boundary ---------------------------------------------------------
def error_state(exc: BaseException) -> dict[str, Any]:
    """A :class:`ModelpressError` as plain data (pickling one would lose its hint and its fields, e.g. Retry-After)."""
    if isinstance(exc, ModelpressError) and getattr(errors, type(exc).__name__, None) is type(exc):
        return {"type": type(exc).__name__, "args": list(exc.args), "fields": dict(vars(exc))}
    message = f"The model replica failed: {exc!r}"
    return {"type": "ModelpressRuntimeError", "args": [message], "fields": {"message": message, "hint": None}}


def rebuild_error(state: dict[str, Any]) -> ModelpressError:
    """The error :func:`error_state` described: the same class, message, hint and fields."""
    cls = getattr(errors, state["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, ModelpressError)):
        cls = errors.ModelpressRuntimeError
    exc = cls.__new__(cls)
    Exception.__init__(exc, *state["args"])
    vars(exc).update(state["fields"])
    return exc


# -- which replica answered (a response header) ---------------------------------------------
_answered_by: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("modelpress_answered_by", default=None)


class ReplicaHeaderMiddleware:
    """Plain ASGI: adds the node and replica that answered a request as response headers.

    The request's first answer (the primary's, not a shadow copy's) fills a holder the request's
    context carries; the headers are added to the response start. ``x-request-id`` is left to
    Ray's proxy, which passes its id to the server (whose middleware echoes it) and sets it on
    the response itself: sent twice, clients would read "id, id".
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: dict[str, str] = {}
        token = _answered_by.set(holder)

        async def send_with_replica(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                if holder:
                    headers += [(NODE_HEADER.encode(), holder["node"].encode()), (REPLICA_HEADER.encode(), holder["replica"].encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            _answered_by.reset(token)


def _note_replica(answer: dict[str, Any]) -> None:
    holder = _answered_by.get()
    if holder is not None and not holder:
        holder.update(node=str(answer.get("node", "")), replica=str(answer.get("replica", "")))


# -- the replica ----------------------------------------------------------------------------
class ModelReplica:
    """One Ray Serve replica of one model version (the deployment's class; Ray constructs it).

    ``model_json`` / ``server_json``: the version's :class:`ModelConfig` and the server's
    :class:`ServerConfig` as JSON (what every replica is built from).
    """

    async def __init__(self, model_json: str, server_json: str) -> None:  # type: ignore[misc]  # Ray awaits an async constructor
        import ray
        from ray import serve

        from modelpress.serving.repository import build_version

        cfg = ModelConfig.model_validate_json(model_json)
        server = ServerConfig.model_validate_json(server_json)
        self.version = await asyncio.to_thread(build_version, cfg, server)  # the runner loads and warms up off the loop
        self.version.batcher.start()  # on this replica's event loop, where its requests are awaited
        self.node_id = ray.get_runtime_context().get_node_id()
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def infer(self, rows: list[Any], lengths: list[int] | None) -> dict[str, Any]:
        """Batch one request's decoded rows with the others sent to this replica; the results, or the error as data."""
        where = {"node": self.node_id, "replica": self.replica_id}
        try:
            results = await self.version.batcher.infer(rows, lengths)
        except Exception as exc:  # noqa: BLE001  (every error goes back to the ingress, which answers the client with it)
            return {"error": error_state(exc), **where}
        return {"results": results, **where}

    def run_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One collated batch through the runner, unbatched (:class:`RemoteRunner`)."""
        return self.version.handler.runner.run(batch)

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.version.runtime,
            "task": self.version.task,
            "load_seconds": self.version.load_seconds,
            "node": self.node_id,
            "replica": self.replica_id,
        }

    async def __del__(self) -> None:
        await self.version.batcher.drain(self.version.config.batching.timeout_s)
        close = getattr(self.version.handler.runner, "close", None)
        if close is not None:
            close()


# -- the ingress's view of a deployed version -----------------------------------------------
class RemoteRunner:
    """The runner the ingress's handler holds: the version's runner on its replicas (one batch, one call)."""

    def __init__(self, handle: Any, name: str) -> None:
        self.handle = handle
        self.name = name

    def load(self) -> None:
        """Nothing to load here: the replicas loaded the model."""

    def run(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Run ``batch`` on one replica (blocking: call it from a worker thread, as the server's batchers do)."""
        return self.handle.run_batch.remote(batch).result()


class RemoteBatcher:
    """What the server asks of a version's :class:`~modelpress.serving.batching.Batcher`, answered by its deployment.

    Each request's rows go to one replica (Ray chooses it), whose own batcher batches them with
    the model's settings. ``depth``: rows sent and not answered yet.
    """

    def __init__(self, handle: Any, config: BatchConfig, *, name: str, on_drained: Any = None) -> None:
        self.handle = handle
        self.config = config
        self.name = name
        self.on_drained = on_drained  # called once the version is drained (the repository deletes its deployment)
        self.accepting = False
        self.depth = 0
        self.requests = 0
        self.app_name = ""  # the version's Ray Serve application

    def start(self) -> RemoteBatcher:
        self.accepting = True
        return self

    async def infer(self, rows: list[Any], lengths: list[int] | None = None, timeout: float | None = None) -> list[Any]:
        from ray.serve.exceptions import BackPressureError

        if not self.accepting:
            raise ModelNotReadyError(f"Model '{self.name}' is not taking requests (it is loading or unloading).", hint="Retry in a moment.")
        limit = (self.config.timeout_s if timeout is None else timeout) + TRANSPORT_MARGIN_S
        self.depth += len(rows)
        self.requests += 1
        response = None
        try:
            response = self.handle.infer.remote(rows, lengths)
            async with asyncio.timeout(limit):
                answer = await response
        except asyncio.CancelledError:  # the client went away: so does the request on its replica
            if response is not None:
                response.cancel()
            raise
        except TimeoutError:
            if response is not None:
                response.cancel()
            raise RequestTimeoutError(
                f"No replica of '{self.name}' answered within {limit:g} s.",
                hint="Retry later, or raise max_replicas (more replicas) or timeout_s in the model's serve config.",
            ) from None
        except BackPressureError:
            raise ServerOverloadedError(
                f"Every replica of '{self.name}' is busy and {self.config.max_queue_size} requests are waiting for one.",
                retry_after_s=1,
                hint="Retry after the time in the Retry-After header, or raise --max-replicas / max_queue_size.",
            ) from None
        finally:
            self.depth -= len(rows)
            self.requests -= 1
        if "error" in answer:
            raise rebuild_error(answer["error"])
        _note_replica(answer)
        return answer["results"]

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking requests; wait (within ``timeout``) for those in flight; then let the repository retire the deployment."""
        self.accepting = False
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.requests and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(DRAIN_POLL_S)
        done = self.requests == 0
        if self.on_drained is not None:
            await self.on_drained()
        return done

    async def close(self) -> None:
        self.accepting = False


def deployment_names(app_prefix: str, model: str, version: str) -> tuple[str, str]:
    """(application, deployment) names of one model version."""
    return f"{app_prefix}.{model}.v{version}", f"{model}-v{version}"


class RayRepository(ModelRepository):
    """The server's repository, with every version deployed to Ray Serve as its own application.

    ``options``: the :class:`~modelpress.scaleout.ray_serve.RayOptions` (replicas, autoscaling).
    Loading a version (at start, through the repository API, or a rollout's candidate) deploys
    it and waits until its replicas are up; retiring one (a hot swap, an unload, a finished
    rollout) drains it and deletes its application. Closing the ingress leaves the deployments
    to whoever shuts the service down (``RayService.shutdown``), so an ingress restarted by Ray
    finds its versions running.
    """

    def __init__(self, config: ServerConfig, metrics: Metrics, options: Any) -> None:
        super().__init__(config, metrics)
        self.options = options
        self.closing = False

    async def build(self, cfg: ModelConfig, *, runner: Any = None, artifact: Any = None) -> LoadedVersion:
        """Deploy the version to Ray instead of loading it here (``load``'s lock, failure record
        and install are the server's own)."""
        if runner is not None or artifact is not None:
            raise ConfigError(
                "The Ray backend loads models by source only (its replicas load them).",
                hint="Pass the model's folder, short name or registry reference as the config's source.",
            )
        return await asyncio.to_thread(self._deploy, cfg)

    def _deploy(self, cfg: ModelConfig) -> LoadedVersion:
        """Deploy one version and wait for its replicas (blocking: runs in a worker thread)."""
        from ray import serve

        from modelpress.registry.names import validate_name
        from modelpress.serving.handlers import handler_for
        from modelpress.tasks import task_for

        t0 = time.perf_counter()
        artifact, name, version, ref = resolve_source(cfg, self.config.registry)
        name = validate_name(cfg.name or name)
        version = cfg.version or version
        task = task_for(artifact)
        if task.name == "causal-lm":
            raise ConfigError(
                f"'{name}' is a causal LM; the Ray backend serves embedding, text-classification and image-classification models.",
                hint="Serve causal LMs with the local backend: modelpress serve MODEL (docs/llm.md).",
            )
        pinned = cfg.model_copy(update={"name": name, "version": version, "threads": cfg.threads or self.options.replica_threads})
        app_name, deployment_name = deployment_names(self.options.app_name, name, version)
        deployment = serve.deployment(name=deployment_name, **self.options.replica_deployment_options(pinned))(ModelReplica)
        app = deployment.bind(pinned.model_dump_json(), self.config.model_dump_json())
        log.info("deploying %s:%s as the Ray Serve application %s", name, version, app_name)
        handle = serve.run(app, name=app_name, route_prefix=None)  # returns once its replicas are up (loaded and warm)
        info = handle.describe.remote().result()
        handler = handler_for(task, RemoteRunner(handle, info["runtime"]), pinned)

        async def retire() -> None:
            # a version taken out of service: its application goes too, unless a reload of the same label (the same
            # application, updated in place by Ray) serves it now
            in_use = any(getattr(v.batcher, "app_name", None) == app_name and v.batcher is not batcher for v in self.versions())
            if not self.closing and not in_use:
                await asyncio.to_thread(serve.delete, app_name, _blocking=False)

        batcher = RemoteBatcher(handle, pinned.batching, name=f"{name}:{version}", on_drained=retire)
        batcher.app_name = app_name
        return LoadedVersion(name, version, handler, batcher, pinned, artifact, time.perf_counter() - t0, registry_ref=ref)  # type: ignore[arg-type]

    async def close(self, timeout: float | None = None) -> None:
        self.closing = True
        await super().close(timeout)


__all__ = [
    "NODE_HEADER",
    "REPLICA_HEADER",
    "ModelReplica",
    "RayRepository",
    "RemoteBatcher",
    "RemoteRunner",
    "ReplicaHeaderMiddleware",
    "deployment_names",
    "error_state",
    "rebuild_error",
]
