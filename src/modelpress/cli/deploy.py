"""``modelpress export MODEL --to kserve|triton DIR``: the files other serving platforms read (modelpress.scaleout).

The options are declared here and used by the ``export`` command in ``cli/main.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from modelpress.cli.common import emit_json, out, progress_bars
from modelpress.errors import ConfigError

TARGETS = ("kserve", "triton")
TO_EXAMPLE = "modelpress export minilm@production --to kserve deploy/kserve"

ToOpt = Annotated[
    str | None,
    typer.Option(
        "--to", help=f"Write what another platform serves instead of an export: {' or '.join(TARGETS)} (then DEST is the folder)."
    ),
]
DestArg = Annotated[Path | None, typer.Argument(help="With --to: the folder to write (default: the --output folder).", show_default=False)]
RuntimeOpt = Annotated[
    str | None,
    typer.Option("--runtime", help="With --to: onnxruntime or openvino (Triton's backend; default onnxruntime), or torch for KServe."),
]
NameOpt = Annotated[str | None, typer.Option("--name", help="With --to: the served name (default: the registry name, else the model's).")]
RegistryOpt = Annotated[str | None, typer.Option("--registry", help="With --to: registry URL or SQLite file for NAME@stage references.")]
MaxBatchOpt = Annotated[int, typer.Option("--max-batch-size", help="With --to: the largest batch (Triton's max_batch_size).")]
DelayOpt = Annotated[float, typer.Option("--max-queue-delay-ms", help="With --to: how long a batch may wait for more requests.")]
QueueOpt = Annotated[int, typer.Option("--max-queue-size", help="With --to: requests queued before answering 429.")]
InstancesOpt = Annotated[int, typer.Option("--instances", help="With --to: model instances (worker threads) per replica.")]
PadOpt = Annotated[
    int | None, typer.Option("--pad-to-length", help="With --to triton: pad every request to this many tokens (lets Triton batch them).")
]
StorageOpt = Annotated[
    str, typer.Option("--storage-uri", help="With --to kserve: where storage/ is uploaded (s3://, gs://, pvc://, https://).")
]
IMAGE_HELP = (
    "With --to kserve: the image to run (default ghcr.io/modelpress/modelpress:0.1.0-cpu; build and push yours from the Dockerfile)."
)
ImageOpt = Annotated[str | None, typer.Option("--image", help=IMAGE_HELP)]
MinRepOpt = Annotated[int, typer.Option("--min-replicas", help="With --to kserve: fewest replicas (0 scales to zero).")]
MaxRepOpt = Annotated[int, typer.Option("--max-replicas", help="With --to kserve: most replicas.")]
MetricOpt = Annotated[str, typer.Option("--scale-metric", help="With --to kserve: concurrency, rps, cpu or memory.")]
TargetOpt = Annotated[
    int | None, typer.Option("--scale-target", help="With --to kserve: target per replica (default: one full batch in flight).")
]
CpuOpt = Annotated[str, typer.Option("--cpu", help="With --to kserve: CPU request and limit per replica.")]
MemOpt = Annotated[str, typer.Option("--memory", help="With --to kserve: memory request and limit per replica.")]
GpuOpt = Annotated[int, typer.Option("--gpus", help="With --to kserve: NVIDIA GPUs per replica.")]
NamespaceOpt = Annotated[str | None, typer.Option("--namespace", help="With --to kserve: the Kubernetes namespace.")]
ModeOpt = Annotated[str | None, typer.Option("--deployment-mode", help="With --to kserve: Serverless (canary needs it) or RawDeployment.")]
RolloutOpt = Annotated[bool, typer.Option("--rollout/--no-rollout", help="With --to kserve: follow an active rollout as a canary.")]


def export_to(target: str, model: str, dest: Path, *, force: bool, as_json: bool, options: dict[str, Any]) -> None:
    """Write ``target``'s files for ``model`` into ``dest`` and say what was written."""
    if target not in TARGETS:
        raise ConfigError(
            f"'{target}' is not a platform modelpress writes files for.", hint=f"Use one of {', '.join(TARGETS)}, e.g. {TO_EXAMPLE}"
        )
    batching = {k: options.pop(k) for k in ("max_batch_size", "max_queue_delay_ms", "max_queue_size", "instances", "pad_to_length")}
    common = {"batching": batching, "name": options.pop("name"), "registry": options.pop("registry"), "overwrite": force}
    with progress_bars(not as_json) as prog:
        prog(f"writing the {target} files for {model}", None)
        if target == "triton":
            from modelpress.scaleout.triton import write_triton_repository

            repo = write_triton_repository(model, dest, runtime=options.get("runtime") or "onnxruntime", **common)
        else:
            from modelpress.scaleout.kserve import DEFAULT_IMAGE, write_kserve_manifest

            kserve = {**options, "image": options.get("image") or DEFAULT_IMAGE}
            written = write_kserve_manifest(model, dest, **kserve, **common)
    if target == "triton":
        if as_json:
            emit_json({"path": str(repo.path), "name": repo.name, "version": repo.version, "models": sorted(repo.configs)})
            return
        out.print(f"[green]wrote[/green] the Triton model repository {repo.path} ({', '.join(sorted(repo.configs))})")
        out.print(f"serve it: tritonserver --model-repository {repo.path}  (the Python steps need `pip install tokenizers`)")
        return
    if as_json:
        emit_json(
            {
                "path": str(written.path),
                "name": written.name,
                "version": written.version,
                "storage_uri": written.storage_uri,
                "canary": written.canary,
            }
        )
        return
    out.print(f"[green]wrote[/green] {written.path / 'inferenceservice.yaml'} ({written.name} version {written.version})")
    if written.canary:
        c = written.canary
        out.print(f"canary: version {c['candidate']} gets {c['percent']}% (the rollout's share), the rest stays on version {c['baseline']}")
    bucket = written.storage_uri.rsplit("/", 2)[0]
    out.print(f"upload {written.path / 'storage'} to {bucket}, then: kubectl apply -f {written.path / 'inferenceservice.yaml'}")
