"""Server and model settings: one pydantic object each, unknown keys rejected, JSON/YAML round-trip.

Batching settings belong to the model endpoint (each model has its own :class:`BatchConfig`);
the server object holds only what is shared: address, limits, keys, drain deadline.

    models:
      - source: minilm                  # a folder, a short name, or a registry ref (NAME@production, NAME:3)
        name: minilm
        runtime: onnxruntime
        batching: {max_batch_size: 32, max_queue_delay_ms: 5, instances: 1}   # instances: default from the cores
    max_body_bytes: 8388608
    api_key: change-me
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelpress.errors import ConfigError

MiB = 1 << 20
MAX_THREADS = 1024  # threads per runner instance: beyond any machine's cores; bounds what a load request may ask
MAX_INSTANCES = 64
# Cores each model instance gets when ``instances`` is not set: one instance (worker thread) per this many cores, each
# with that many intra-op threads. On a quiet 2-core AMD EPYC (AVX2), MiniLM on torch at concurrency 64 served 189 req/s
# with 2 instances x 1 thread against 149 with 1 x 2, in the same interleaved rounds (1.27x; docs/serving-performance.md):
# a batch on one thread never waits at an operator's barrier for a thread the event loop or the tokenizer took the core
# from. Several instances call one runner at once: every runtime's runner is safe for that (torch eager and compiled,
# TorchScript, AOTInductor's model pool, ONNX Runtime sessions, OpenVINO with one infer request per thread, ExecuTorch
# and tensor-parallel runners behind a lock; tests/runtimes/test_concurrent_runs.py). A lone request then runs on one
# core: set ``instances: 1`` (threads: all cores) where the latency of single requests matters more than throughput.
CORES_PER_INSTANCE = 1
# Runtimes whose runner runs one call at a time however many threads call it (Runner.parallel_calls False: OpenVINO's
# one stream per compiled model, ExecuTorch's lock): a model on one of these gets one instance with every core when the
# config does not set ``instances`` (several instances of 1 thread each would share one thread). A test checks this
# list against the runners.
SERIAL_RUNTIMES = ("openvino", "openvino-decoder", "executorch")
# A client must send its whole request body within this many seconds of the first read (else 408): a client that sends
# half a body and stalls holds one of the max_concurrent_requests slots; 30 s lets a slow link (~300 KB/s) send 8 MiB.
BODY_READ_TIMEOUT_S = 30.0


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the CPU count)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def default_instances(cores: int | None = None) -> int:
    """Model instances per loaded version when the config does not say: one per :data:`CORES_PER_INSTANCE` cores."""
    return max(1, min(MAX_INSTANCES, (cores or machine_cores()) // CORES_PER_INSTANCE))


class BatchConfig(BaseModel):
    """How one loaded model version batches requests.

    A batch is dispatched at once when a worker is free and no other batch of this version is
    running (so a lone request never waits); while other batches run, it waits up to
    ``max_queue_delay_ms`` (from its oldest request) for more, up to ``max_batch_size`` rows.
    """

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_queue_delay_ms: float = Field(5.0, ge=0.0, le=10_000.0)
    max_queue_size: int = Field(1024, ge=1, le=1_000_000)  # rows waiting; beyond it: 429
    timeout_s: float = Field(30.0, gt=0.0, le=3600.0)  # per request; beyond it: 504
    # runner instances (worker threads) running batches of this version at once; default: from this machine's cores
    # (default_instances), each instance with its share of the cores as threads (ModelConfig.threads)
    instances: int = Field(default_factory=lambda: default_instances(), ge=1, le=MAX_INSTANCES)
    bucketing: bool = True  # text: group queued rows of similar token length into one batch
    pad_to_length: int | None = Field(None, ge=1)  # text: pad every batch to this length (naive servers do; for comparisons)


class ModelConfig(BaseModel):
    """One model to serve: where it comes from, how it runs, how it batches."""

    model_config = ConfigDict(extra="forbid")
    source: str  # folder, .onnx file, short name (minilm), or registry ref (NAME@production, NAME:3)
    name: str | None = None  # served name (default: the registry name, else the artifact's name)
    version: str | None = None  # served version label (default: the registry version, else "1")
    task: str | None = None
    runtime: str | None = None  # torch, onnxruntime, openvino; None: the runtime the artifact's manifest records, else torch
    engine: str | None = None  # causal LMs: the generation engine (torch, ...); None: torch (see docs/llm.md)
    threads: int | None = Field(None, ge=1, le=MAX_THREADS)  # per instance (default: the cores divided among instances)
    runtime_options: dict[str, Any] = Field(default_factory=dict)
    batching: BatchConfig = Field(default_factory=BatchConfig)
    max_text_chars: int = Field(100_000, ge=1, le=10_000_000)  # per input text; longer ones answer 400 before tokenizing
    allow_non_finite: bool = False  # float inputs with NaN or Inf answer 400 unless this is set
    warmup: bool = True

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("source is empty; give a folder, a short name (minilm) or a registry ref (NAME@production)")
        return v.strip()

    @model_validator(mode="after")
    def _one_instance_for_serial_runtimes(self) -> ModelConfig:
        ranks = self.runtime_options.get("tensor_parallel")
        serial = self.runtime in SERIAL_RUNTIMES or (isinstance(ranks, int) and ranks > 1)  # tensor-parallel: a lock
        if serial and "instances" not in self.batching.model_fields_set:
            self.batching = self.batching.model_copy(update={"instances": 1})
        return self


class ServerConfig(BaseModel):
    """The whole server: models plus the settings every endpoint shares."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelConfig] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(8 * MiB, ge=1024, le=1024 * MiB)  # larger bodies answer 413
    # management routes always need a key: this one, else one generated at start into $MODELPRESS_HOME/server.key (0600)
    api_key: str | None = None
    management: bool = True  # false: management routes (repository load/unload, rollouts, feedback) answer 403
    protect_inference: bool = False  # require the key on inference endpoints too (/v2/models..., /v1/..., /invocations)
    protect_health: bool = False  # ... on /v2, /v2/health/*, /v2/models/{m}/ready, /ping
    protect_metrics: bool = False  # ... on /metrics
    protect_dashboard: bool = False  # ... on /dashboard
    protect_docs: bool = False  # ... on /docs, /redoc, /openapi.json
    allowed_hosts: list[str] = Field(default_factory=list, max_length=64)  # Host names a loopback-bound server answers besides localhost
    max_concurrent_requests: int = Field(1024, ge=1, le=1_000_000)  # requests answered at once; beyond: 503 + Retry-After
    # folders the repository load endpoint may load from (besides registry refs and the configured sources)
    allow_load_from: list[str] = Field(default_factory=list, max_length=64)
    max_models: int = Field(64, ge=1, le=10_000)  # model names served at once; a load of one more answers 409
    registry: str | None = None  # registry URL or SQLite file for NAME@stage / NAME:VERSION sources
    drain_timeout_s: float = Field(30.0, ge=0.0)  # graceful shutdown: how long in-flight requests may finish
    body_timeout_s: float = Field(BODY_READ_TIMEOUT_S, gt=0.0, le=3600.0)  # a request body must arrive within this (else 408)
    access_log: bool = True
    # answer each inference request's stage times in a Server-Timing header (decode, queue, batch; ms): where the time
    # of a slow request went, in a browser's network panel or curl -i; off by default (it tells a client how busy the
    # queue is)
    server_timing: bool = False
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"

    @field_validator("allowed_hosts")
    @classmethod
    def _lower_hosts(cls, v: list[str]) -> list[str]:
        return [h.strip().lower() for h in v if h.strip()]

    @field_validator("api_key")
    @classmethod
    def _key_length(cls, v: str | None) -> str | None:
        if v is not None and len(v) < 8:
            raise ValueError("api_key must have at least 8 characters (e.g. the output of `openssl rand -hex 16`)")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> ServerConfig:
        names = [m.name for m in self.models if m.name]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dup)}")
        return self

    @classmethod
    def from_models(cls, sources: list[str], **settings: Any) -> ServerConfig:
        """A config serving ``sources`` (folders, short names or registry refs) with one set of settings.

        ``settings``: ModelConfig fields (runtime, threads, ...) and BatchConfig fields
        (max_batch_size, max_queue_delay_ms, ...); None values are left at their defaults.
        """
        batch_keys = set(BatchConfig.model_fields)
        batch = {k: v for k, v in settings.items() if k in batch_keys and v is not None}
        model = {k: v for k, v in settings.items() if k not in batch_keys and v is not None}
        return validated(cls, {"models": [{"source": s, **model, "batching": batch} for s in sources]}, "the serve options")


SERVER_CONFIG_EXAMPLE = "{models: [{source: minilm, batching: {max_batch_size: 32}}], port: 8000}"


def validated(
    kind: type[BaseModel], data: Any, where: str, *, what: str = "server configuration", example: str = SERVER_CONFIG_EXAMPLE
) -> Any:
    """``data`` as a ``kind``, or a :class:`ConfigError` naming ``what`` was invalid in ``where``, with a valid ``example``."""
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"Invalid {what} in {where}: {problems}", hint=f"Example: {example}. Unknown keys are rejected.") from None


def load_config(path: str | os.PathLike) -> ServerConfig:
    """Read a server config from a YAML or JSON file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"The server config '{p}' does not exist.", hint="Example: modelpress serve --config serve.yaml")
    import yaml

    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"The server config '{p}' could not be parsed: {exc}", hint="Check the syntax (indentation, colons, quotes)."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"The server config '{p}' must hold a mapping, not {type(data).__name__}.", hint="Example: models: [{source: minilm}]"
        )
    return validated(ServerConfig, data, str(p))
