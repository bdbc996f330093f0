"""The ``modelpress serve`` command: the model server with rollouts and the dashboard (:func:`modelpress.rollout.serve`),
or the same server on Ray Serve with ``--backend ray`` (:func:`modelpress.scaleout.ray_serve.serve`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from modelpress.scaleout.ray_serve import RayOptions

RAY = "Ray Serve (--backend ray)"  # the help panel of the scale-out options
RAY_FLAGS = {  # RayOptions field -> its flag
    "address": "--ray-address",
    "min_replicas": "--min-replicas",
    "max_replicas": "--max-replicas",
    "target_ongoing_requests": "--target-ongoing-requests",
    "downscale_delay_s": "--downscale-delay",
    "upscale_delay_s": "--upscale-delay",
    "replica_cpus": "--replica-cpus",
    "options": "--ray-options",
}


def register_commands(app: typer.Typer) -> None:
    from modelpress.cli.common import handle_errors

    @app.command()
    @handle_errors
    def serve(
        models: Annotated[
            list[str] | None, typer.Argument(help="Model folders, short names (minilm) or registry references (NAME@production, NAME:3).")
        ] = None,
        config: Annotated[
            str | None, typer.Option("--config", "-c", help="A YAML or JSON file listing the models and their batch settings.")
        ] = None,
        host: Annotated[str | None, typer.Option("--host", help="Address to listen on (default 127.0.0.1).")] = None,
        port: Annotated[int | None, typer.Option("--port", help="Port to listen on (default 8000).")] = None,
        runtime: Annotated[
            str | None,
            typer.Option(
                "--runtime",
                "-r",
                help="torch, onnxruntime, openvino (for every model named on the command line; "
                "default: the runtime each one's manifest records, else torch).",
            ),
        ] = None,
        threads: Annotated[
            int | None, typer.Option("--threads", help="Threads per model instance (default: all cores / instances).")
        ] = None,
        engine: Annotated[
            str | None,
            typer.Option(
                "--engine",
                help="Causal LMs: the generation engine (torch, openvino, onnxruntime, llamacpp, auto; default torch, the reference). "
                "docs/llm.md.",
            ),
        ] = None,
        tensor_parallel: Annotated[
            int | None,
            typer.Option(
                "--tensor-parallel",
                min=1,
                help="Split each model named on the command line over N worker processes on 127.0.0.1 (the torch runtime "
                "and the torch engine; N divides the model's attention heads). docs/tensor-parallel.md.",
            ),
        ] = None,
        instances: Annotated[
            int | None,
            typer.Option(
                "--instances",
                min=1,
                help="Runner instances (worker threads, each with --threads threads) per model "
                "(default: one per 4 cores, at least 1; docs/serving-performance.md).",
            ),
        ] = None,
        max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Largest batch the batcher forms.")] = 32,
        max_queue_delay_ms: Annotated[
            float, typer.Option("--max-queue-delay-ms", help="How long a batch may wait for more requests when others are queued.")
        ] = 5.0,
        max_queue_size: Annotated[int, typer.Option("--max-queue-size", help="Requests queued per model before answering 429.")] = 1024,
        timeout_s: Annotated[float, typer.Option("--timeout", help="Seconds a request may take before answering 504.")] = 30.0,
        api_key: Annotated[
            str | None,
            typer.Option(
                "--api-key",
                envvar="MODELPRESS_API_KEY",
                help="Key the management endpoints require (header X-API-Key or Bearer). Without one the server generates "
                "a key into $MODELPRESS_HOME/server.key (mode 0600), which local clients read. Required with a non-loopback --host.",
            ),
        ] = None,
        protect_inference: Annotated[
            bool, typer.Option("--protect-inference", help="Require the API key on inference endpoints too.")
        ] = False,
        protect_health: Annotated[bool, typer.Option("--protect-health", help="Require the API key on health endpoints.")] = False,
        protect_metrics: Annotated[bool, typer.Option("--protect-metrics", help="Require the API key on /metrics.")] = False,
        protect_dashboard: Annotated[bool, typer.Option("--protect-dashboard", help="Require the API key on /dashboard.")] = False,
        protect_docs: Annotated[bool, typer.Option("--protect-docs", help="Require the API key on /docs and /openapi.json.")] = False,
        server_timing: Annotated[
            bool, typer.Option("--server-timing", help="Answer inference with a Server-Timing header: decode, queue, batch (ms).")
        ] = False,
        protect_all: Annotated[
            bool, typer.Option("--protect-all", help="Require the API key on every route (all of the --protect-* options).")
        ] = False,
        management: Annotated[
            bool, typer.Option("--management/--no-management", help="Serve the management routes (repository, rollouts, feedback).")
        ] = True,
        allowed_host: Annotated[
            list[str] | None,
            typer.Option("--allowed-host", help="A Host name a server on 127.0.0.1 answers besides localhost (a proxy's); repeatable."),
        ] = None,
        allow_load_from: Annotated[
            list[str] | None,
            typer.Option("--allow-load-from", help="A folder whose models the repository load endpoint may load; repeatable."),
        ] = None,
        max_concurrent_requests: Annotated[
            int | None, typer.Option("--max-concurrent-requests", help="Requests answered at once; more answer 503 (default 1024).")
        ] = None,
        registry: Annotated[
            str | None,
            typer.Option("--registry", help="Registry URL or SQLite file (default: $MODELPRESS_REGISTRY_URL, then ~/.modelpress)."),
        ] = None,
        log_level: Annotated[str | None, typer.Option("--log-level", help="debug, info, warning, error (default info).")] = None,
        backend: Annotated[
            str, typer.Option("--backend", help="local (this process) or ray (Ray Serve deployments; docs/ray.md).", rich_help_panel=RAY)
        ] = "local",
        ray_address: Annotated[
            str | None,
            typer.Option(
                "--ray-address", help="Ray cluster to deploy to (auto, HOST:6379); default: a new local Ray.", rich_help_panel=RAY
            ),
        ] = None,
        min_replicas: Annotated[
            int | None, typer.Option("--min-replicas", help="Replicas per model version, at least (default 1).", rich_help_panel=RAY)
        ] = None,
        max_replicas: Annotated[
            int | None,
            typer.Option(
                "--max-replicas",
                help="Replicas per model version, at most (default 1, or --min-replicas when only that is given).",
                rich_help_panel=RAY,
            ),
        ] = None,
        target_ongoing_requests: Annotated[
            float | None,
            typer.Option(
                "--target-ongoing-requests", help="Requests in flight per replica the autoscaler aims at (default 2).", rich_help_panel=RAY
            ),
        ] = None,
        downscale_delay: Annotated[
            str | None,
            typer.Option(
                "--downscale-delay", help="Load must stay low this long before a replica goes (default 10m).", rich_help_panel=RAY
            ),
        ] = None,
        upscale_delay: Annotated[
            str | None,
            typer.Option(
                "--upscale-delay", help="Load must stay high this long before a replica is added (default 30s).", rich_help_panel=RAY
            ),
        ] = None,
        ray_options_file: Annotated[
            str | None,
            typer.Option(
                "--ray-options",
                help="A YAML or JSON file of further Ray options (autoscaling, proxy_location, ingress_cpus; docs/ray.md); flags win.",
                rich_help_panel=RAY,
            ),
        ] = None,
        replica_cpus: Annotated[
            float | None,
            typer.Option("--replica-cpus", help="CPUs each model replica reserves and runs on (default 1).", rich_help_panel=RAY),
        ] = None,
    ) -> None:
        """Serve models over HTTP: KServe v2, OpenAI embeddings, completions and chat (causal LMs), SageMaker; /metrics for Prometheus."""
        from modelpress.errors import require
        from modelpress.serving.config import ServerConfig, load_config, validated

        require("fastapi", "serve")
        require("uvicorn", "serve")
        ray_flags = {
            "address": ray_address,
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests,
            "downscale_delay_s": _seconds(downscale_delay, "--downscale-delay"),
            "upscale_delay_s": _seconds(upscale_delay, "--upscale-delay"),
            "replica_cpus": replica_cpus,
        }
        ray_opts = _ray_options(backend, ray_options_file, ray_flags)  # bad flags fail here, before any model loads
        if tensor_parallel is not None and backend == "ray":
            from modelpress.errors import ConfigError

            raise ConfigError(
                "--tensor-parallel is not supported with --backend ray (Ray schedules replicas, not their worker processes).",
                hint="Example: modelpress serve DIR --tensor-parallel 2 (the local backend)",
            )
        if tensor_parallel is not None and (runtime not in (None, "torch") or engine not in (None, "torch")):
            from modelpress.errors import ConfigError

            raise ConfigError(
                f"--tensor-parallel splits a model on the torch runtime and the torch engine, not {runtime or engine!r}.",
                hint="Example: modelpress serve minilm --tensor-parallel 2 (without --runtime/--engine, or with torch)",
            )
        cfg = load_config(config) if config is not None else ServerConfig()
        if models:  # models named on the command line come after the config file's
            named = ServerConfig.from_models(
                models,
                runtime=runtime,
                engine=engine,
                threads=threads,
                runtime_options={"tensor_parallel": tensor_parallel} if tensor_parallel is not None else None,
                instances=instances,
                max_batch_size=max_batch_size,
                max_queue_delay_ms=max_queue_delay_ms,
                max_queue_size=max_queue_size,
                timeout_s=timeout_s,
            )
            cfg = cfg.model_copy(update={"models": [*cfg.models, *named.models]})
        if not cfg.models:
            from modelpress.errors import ConfigError

            raise ConfigError("No model to serve.", hint="Example: modelpress serve minilm (or --config serve.yaml)")
        settings = {
            "host": host,
            "port": port,
            "log_level": log_level,
            "registry": registry,
            "api_key": api_key or None,
            "max_concurrent_requests": max_concurrent_requests,
            "allowed_hosts": [*cfg.allowed_hosts, *allowed_host] if allowed_host else None,
            "allow_load_from": [*cfg.allow_load_from, *allow_load_from] if allow_load_from else None,
        }
        update: dict[str, object] = {k: v for k, v in settings.items() if v is not None}
        if not management:
            update["management"] = False
        if server_timing:
            update["server_timing"] = True
        flags = {
            "inference": protect_inference,
            "health": protect_health,
            "metrics": protect_metrics,
            "dashboard": protect_dashboard,
            "docs": protect_docs,
        }
        for kind, on in flags.items():  # a flag given without --api-key protects the route with the generated key
            if on or protect_all:
                update[f"protect_{kind}"] = True
        cfg = validated(ServerConfig, {**cfg.model_dump(), **update}, "the serve options")
        from modelpress.serving.app import check_bind

        check_bind(cfg)  # before any model loads: a non-loopback address needs a key
        if ray_opts is not None:
            from modelpress.scaleout.ray_serve import serve as serve_on_ray

            serve_on_ray(cfg, ray_opts)
            return
        from modelpress.rollout import serve as run_server

        run_server(cfg)


def _seconds(text: str | None, what: str) -> float | None:
    """A duration flag in seconds (0 allowed: no delay), None when not given."""
    if text is None:
        return None
    if text.strip().lower() in ("0", "0s", "0ms"):
        return 0.0
    from modelpress.units import parse_duration

    return parse_duration(text, what)


def _ray_options(backend: str, path: str | None, flags: dict[str, Any]) -> RayOptions | None:
    """The Ray options for ``--backend ray`` (None for local); Ray flags with the local backend are an error."""
    from modelpress.scaleout.ray_serve import check_backend, ray_options

    if check_backend(backend) == "ray":
        if path is None and flags["max_replicas"] is None and flags["min_replicas"] is not None:  # --min-replicas alone: that many
            flags = {**flags, "max_replicas": flags["min_replicas"]}
        return ray_options(path, **flags)
    given = sorted(RAY_FLAGS[name] for name, value in {**flags, "options": path}.items() if value is not None)
    if given:
        from modelpress.errors import ConfigError

        raise ConfigError(
            f"Replica and Ray options ({', '.join(given)}) apply to --backend ray only.",
            hint="Example: modelpress serve minilm --backend ray --min-replicas 1 --max-replicas 4",
        )
    return None
