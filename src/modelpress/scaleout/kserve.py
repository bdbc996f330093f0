"""A KServe InferenceService for a served model: the modelpress image as a custom predictor speaking KServe v2.

    write_kserve_manifest("minilm@production", "deploy/kserve", storage_uri="s3://models/modelpress")
    # modelpress export minilm@production --to kserve deploy/kserve --storage-uri s3://models/modelpress

writes::

    inferenceservice.yaml              kubectl apply -f it
    storage/<name>/<version>/          upload to <storage-uri>/<name>/<version> (e.g. aws s3 sync storage s3://models/modelpress)
        model/                         the model's files (the ONNX / OpenVINO export with --runtime onnxruntime|openvino)
        serve.yaml                     the server config: the served name, version, runtime and batching settings

KServe's storage initializer downloads ``STORAGE_URI`` to ``/mnt/models``; the container runs
``modelpress serve --config /mnt/models/serve.yaml`` on port 8080 (KServe's port for custom
predictors), answering KServe v2 (``/v2/models/NAME/infer``), OpenAI and SageMaker routes with the
same name and version as ``modelpress serve`` on a laptop. Replicas scale between
``min_replicas`` and ``max_replicas`` on ``scale_metric`` (default: concurrency, target one full
batch per replica). When a rollout of the model is active in the registry, the manifest describes
its candidate with ``canaryTrafficPercent`` set to the candidate's share of traffic: KServe sends
the rest to the previously rolled-out revision (the baseline, applied before from this same command
without a rollout). The server key comes from the Secret ``<isvc-name>-modelpress`` (key ``api-key``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpress._fs import atomic_folder
from modelpress.errors import ConfigError
from modelpress.scaleout.source import EXPORT_FORMAT, Resolved, check_output, copy_model_files, exported_form, resolve
from modelpress.serving.config import BatchConfig, ModelConfig, ServerConfig, validated

DEFAULT_IMAGE = "ghcr.io/modelpress/modelpress:0.1.0-cpu"
PORT = 8080  # KServe's container port for custom predictors (and SageMaker's)
MOUNT = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI
SCALE_METRICS = ("concurrency", "rps", "cpu", "memory")  # the CRD's enum
EXAMPLE = "modelpress export minilm@production --to kserve deploy/kserve --storage-uri s3://models/modelpress"
_DNS = re.compile(r"[^a-z0-9-]+")


@dataclass
class KServeManifest:
    """What :func:`write_kserve_manifest` wrote: the folder, the manifest, and the version the predictor serves."""

    path: Path
    manifest: dict[str, Any]
    name: str
    version: str
    storage_uri: str
    canary: dict[str, Any] | None  # {"baseline", "candidate", "percent", "policy"} when a rollout is active


def isvc_name(name: str) -> str:
    """An InferenceService name (a DNS-1035 label: lowercase letters, digits, '-') for a served name."""
    out = _DNS.sub("-", name.lower()).strip("-")
    if not out or not out[0].isalpha():
        out = f"m-{out}".rstrip("-")
    return out[:63].rstrip("-")


def active_rollout(resolved: Resolved, registry: str | None) -> dict[str, Any] | None:
    """The active rollout (from the registry's deployments) whose baseline or candidate is this version, as a canary."""
    if resolved.registry_ref is None:
        return None
    from modelpress.registry.api import Registry
    from modelpress.rollout.spec import ACTIVE

    model = resolved.registry_ref.split(":")[0]
    with Registry(registry) as reg:
        deployments = reg.rollouts.list()
    for dep in deployments:
        state = dep.get("rollout_state") or {}
        if dep.get("model") != model or state.get("status") not in ACTIVE:
            continue
        baseline, candidate = str(state.get("baseline")), str(state.get("candidate"))
        if resolved.version not in (baseline, candidate):
            continue
        policy = dep.get("traffic_policy") or {}
        kind = policy.get("policy")
        if state.get("status") == "loading" or kind == "shadow":  # a mirror answers no client: KServe has no shadow traffic
            percent = 0.0
        elif kind == "split":
            weights = {str(k): float(v) for k, v in (policy.get("weights") or {}).items()}
            total = sum(weights.values()) or 1.0
            percent = 100.0 * weights.get(candidate, 0.0) / total
        else:
            percent = 100.0 if str(policy.get("version")) == candidate else 0.0
        return {"deployment": dep["name"], "baseline": baseline, "candidate": candidate, "percent": round(percent), "policy": kind}
    return None


def _server_config(resolved: Resolved, runtime: str | None, batching: BatchConfig, source: str) -> dict[str, Any]:
    model = {"source": source, "name": resolved.name, "version": resolved.version, "batching": batching.model_dump()}
    if runtime is not None:
        model["runtime"] = runtime
    validated(ModelConfig, model, "the KServe server config", what="model config")
    doc = {
        "models": [model],
        "host": "0.0.0.0",
        "port": PORT,
        "registry": None,
    }  # a pod listens on its own interface (the key comes from a Secret)
    validated(ServerConfig, doc, "the KServe server config")
    return {k: v for k, v in doc.items() if v is not None}


def _resources(cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    res: dict[str, Any] = {"requests": {"cpu": str(cpu), "memory": str(memory)}, "limits": {"cpu": str(cpu), "memory": str(memory)}}
    if gpus:
        res["limits"]["nvidia.com/gpu"] = str(gpus)
    return res


def write_kserve_manifest(
    source: str,
    output: str | os.PathLike,
    *,
    storage_uri: str = "s3://models/modelpress",
    image: str = DEFAULT_IMAGE,
    runtime: str | None = None,
    batching: BatchConfig | dict[str, Any] | None = None,
    min_replicas: int = 1,
    max_replicas: int = 3,
    scale_metric: str = "concurrency",
    scale_target: int | None = None,
    cpu: str = "2",
    memory: str = "4Gi",
    gpus: int = 0,
    namespace: str | None = None,
    deployment_mode: str | None = None,
    name: str | None = None,
    registry: str | None = None,
    rollout: bool = True,
    overwrite: bool = False,
) -> KServeManifest:
    """Write an InferenceService manifest for ``source`` (a registry ref, folder or short name) and its storage layout into ``output``.

    ``storage_uri``: the bucket prefix the ``storage/`` folder is uploaded to (s3://, gs://,
    pvc://, https://...); ``runtime``: the runtime in the pod (onnxruntime and openvino ship the
    parity-checked export, so the pod never exports at start; default: the model's own);
    ``batching``: the serving settings; ``scale_target``: per replica, default one full batch
    (``max_batch_size * instances`` requests in flight) for ``concurrency``; ``rollout=False``
    ignores an active rollout. The folder is written whole or not at all.
    """
    batch = (
        batching
        if isinstance(batching, BatchConfig)
        else validated(BatchConfig, batching or {}, "the batching options", what="batching settings", example="--max-batch-size 32")
    )
    if scale_metric not in SCALE_METRICS:
        raise ConfigError(
            f"'{scale_metric}' is not a KServe scale metric.",
            hint=f"Use one of {', '.join(SCALE_METRICS)}, e.g. --scale-metric concurrency",
        )
    if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
        raise ConfigError(
            f"Replicas must satisfy 0 <= min ({min_replicas}) <= max ({max_replicas}) and max >= 1.",
            hint="Example: --min-replicas 1 --max-replicas 4",
        )
    if runtime is not None and runtime not in (*EXPORT_FORMAT, "torch"):
        raise ConfigError(
            f"'{runtime}' is not a runtime the image serves.", hint="Use torch, onnxruntime or openvino, e.g. --runtime onnxruntime"
        )
    if deployment_mode not in (None, "Serverless", "RawDeployment", "Standard", "Knative"):
        raise ConfigError(
            f"'{deployment_mode}' is not a KServe deployment mode.", hint="Use Serverless (canary needs it) or RawDeployment."
        )
    if "://" not in storage_uri:
        raise ConfigError(
            f"'{storage_uri}' is not a storage URI.", hint="Example: --storage-uri s3://models/modelpress (or gs://, pvc://, https://)"
        )
    out = check_output(output, overwrite, EXAMPLE)
    resolved = resolve(source, name=name, registry=registry)
    canary = active_rollout(resolved, registry) if rollout else None
    registry_model = resolved.registry_ref.split(":")[0] if resolved.registry_ref else None
    versions = {resolved.version: resolved}
    served = resolved
    if canary is not None and registry_model is not None:  # the manifest describes the candidate; KServe already runs the baseline
        versions = {
            v: resolve(f"{registry_model}:{v}", name=resolved.name, registry=registry) for v in (canary["baseline"], canary["candidate"])
        }
        served = versions[canary["candidate"]]
    base = storage_uri.rstrip("/")
    uri = f"{base}/{resolved.name}/{served.version}"
    target = scale_target if scale_target is not None else batch.max_batch_size * batch.instances
    key_secret = f"{isvc_name(resolved.name)}-modelpress"
    container: dict[str, Any] = {
        "name": "kserve-container",
        "image": image,
        "args": ["serve", "--config", f"{MOUNT}/serve.yaml"],
        "env": [
            {"name": "STORAGE_URI", "value": uri},
            {"name": "MODELPRESS_API_KEY", "valueFrom": {"secretKeyRef": {"name": key_secret, "key": "api-key"}}},
            {"name": "MODELPRESS_HOME", "value": "/tmp/modelpress"},
        ],
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        "resources": _resources(cpu, memory, gpus),
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": PORT}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": PORT}, "periodSeconds": 15},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
    }
    predictor: dict[str, Any] = {
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "scaleMetric": scale_metric,
        "scaleTarget": target,
    }
    if canary is not None:
        predictor["canaryTrafficPercent"] = canary["percent"]
    predictor["containers"] = [container]
    annotations = {"modelpress.io/model": resolved.name, "modelpress.io/version": served.version}
    if served.registry_ref:
        annotations["modelpress.io/registry-ref"] = served.registry_ref
    if canary is not None:
        annotations["modelpress.io/baseline"] = canary["baseline"]
    if deployment_mode:
        annotations["serving.kserve.io/deploymentMode"] = deployment_mode
    metadata: dict[str, Any] = {"name": isvc_name(resolved.name), "annotations": annotations}
    if namespace:
        metadata["namespace"] = namespace
    manifest = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {"predictor": predictor},
    }

    import yaml

    with atomic_folder(out) as tmp:
        for v, one in versions.items():
            folder = tmp / "storage" / resolved.name / v
            files = one.artifact if runtime not in EXPORT_FORMAT else exported_form(one, runtime)
            copy_model_files(files, folder / "model")
            if files is one.artifact and one.registry_ref:  # a stored folder may hold another version's manifest: write this one's
                (folder / "model" / "modelpress.json").write_text(one.artifact.manifest.model_dump_json(indent=2))
            config = _server_config(one, runtime, batch, f"{MOUNT}/model")
            (folder / "serve.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "inferenceservice.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return KServeManifest(out, manifest, resolved.name, served.version, uri, canary)
