"""``modelpress registry ...``: every command calls the :class:`~modelpress.registry.api.Registry` method of the same name.

The main CLI mounts this as ``app.add_typer(registry_app, name="registry")``. Each command takes
``--registry URL`` (default ``$MODELPRESS_REGISTRY_URL``, else ``~/.modelpress/registry.db``) and
``--json``. A modelpress error is printed in red with its hint and exits with its code (2 for
what the user asked, 3 for a missing backend), no traceback; ``check`` exits 1 when it finds damage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from modelpress.cli.common import JsonOpt, console, emit_json, handle_errors, out
from modelpress.errors import ConfigError

if TYPE_CHECKING:
    from modelpress.registry.api import Registry

app = typer.Typer(
    name="registry",
    help="Versions, lineage, metrics and stages of every model variant.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry", help="Registry database URL or SQLite file (default: $MODELPRESS_REGISTRY_URL, else ~/.modelpress/registry.db)."
    ),
]
RefArg = Annotated[str, typer.Argument(help="NAME (latest), NAME:VERSION, NAME:latest or NAME@stage.")]


def _open(url: str | None) -> Registry:
    """The registry at ``url`` (a context manager: ``with _open(url) as reg``), imported only when a command runs."""
    from modelpress.registry.api import Registry

    return Registry(url=url)


def _metrics_text(mv: Any, limit: int = 3) -> str:
    latest: dict[str, float] = {}
    for m in mv.metrics:
        latest[m["name"]] = m["value"]
    return ", ".join(f"{k} {v:.4g}" for k, v in list(latest.items())[:limit])


@app.command("list")
@handle_errors
def list_cmd(
    name: Annotated[str | None, typer.Argument(help="A model name: list its versions instead of the models.")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the models, or the versions of one model."""
    from rich.table import Table

    with _open(registry) as reg:
        if name is None:
            models = reg.list_models()
            if as_json:
                emit_json(models)
                return
            if not models:
                console.print("The registry is empty. Register a model: modelpress registry register PATH --name NAME")
                return
            table = Table(title=f"models in {reg.url.render_as_string(hide_password=True)}", title_justify="left")
            for col in ("name", "versions", "latest", "production", "updated"):
                table.add_column(col)
            for m in models:
                table.add_row(m["name"], str(m["versions"]), str(m["latest"] or "-"), str(m["production"] or "-"), m["updated_at"] or "-")
            out.print(table)
            return
        versions = reg.list_versions(name)
        if as_json:
            emit_json([v.to_json() for v in versions])
            return
        table = Table(title=f"versions of {name}", title_justify="left")
        for col in ("version", "stage", "parent", "step", "metrics", "tags", "created"):
            table.add_column(col, no_wrap=col in ("version", "stage", "created"), overflow="fold")
        for v in versions:
            cells = (
                str(v.version),
                v.stage,
                v.parent or "-",
                v.step or "-",
                _metrics_text(v),
                ", ".join(v.tags) or "-",
                (v.created_at or "-")[:10],
            )
            table.add_row(*(escape(c) for c in cells))
        out.print(table)


@app.command()
@handle_errors
def show(ref: RefArg, registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Show one version: files, how it was made, metrics, stage history, tags and notes."""
    from rich.table import Table

    with _open(registry) as reg:
        mv = reg.get(ref)
    if as_json:
        emit_json(mv.to_json())
        return
    table = Table(title=f"{mv.ref} ({mv.stage})", title_justify="left", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # hashes and paths are copied from here: wrap them, never cut them
    rows = {
        "task": mv.task,
        "format": mv.format,
        "model file": mv.model_file or "-",
        "content hash": mv.content_hash,
        "path": str(mv.path),
        "size": f"{mv.size_bytes:,} bytes",
        "created": f"{mv.created_at} by {mv.created_by or '?'}",
        "parent": ", ".join(mv.parents) or "-",
        "step": f"{mv.step} {json.dumps(mv.config)}" if mv.step else "-",
        "tags": ", ".join(mv.tags) or "-",
    }
    for k, v in rows.items():
        table.add_row(k, escape(str(v)))
    for m in mv.metrics:
        where = ", ".join(str(m[k]) for k in ("dataset", "runtime", "machine") if m.get(k))
        table.add_row(escape(f"{m['kind']}: {m['name']}"), f"{m['value']:.6g}" + (f"  ({escape(where)})" if where else ""))
    for e in mv.stage_history:
        table.add_row(
            "stage",
            escape(f"{e['at']}  {e['from'] or '-'} -> {e['to']} ({e['action']}, {e['who'] or '?'}){': ' + e['why'] if e['why'] else ''}"),
        )
    for n in mv.notes:
        table.add_row("note", escape(f"{n['at']} {n['who'] or '?'}: {n['text']}"))
    out.print(table)


@app.command()
@handle_errors
def lineage(ref: RefArg, registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """The family tree of a version: from the original to every descendant, each step and metric change."""
    from modelpress.registry.lineage import render_tree

    with _open(registry) as reg:
        tree = reg.lineage(ref)
    if as_json:
        emit_json(tree)
        return
    out.print(render_tree(tree))


@app.command()
@handle_errors
def register(
    path: Annotated[Path, typer.Argument(help="An artifact folder (with modelpress.json), e.g. the output of `modelpress export`.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Model name: letters, digits, '-', '_', '.' (e.g. minilm-sts).")],
    parent: Annotated[str | None, typer.Option("--parent", help="The version it was made from, e.g. minilm:1.")] = None,
    step: Annotated[str | None, typer.Option("--step", help="The step that made it: a technique name or a JSON config.")] = None,
    stage: Annotated[str, typer.Option("--stage", help="candidate, staging, production or archived.")] = "candidate",
    metric: Annotated[list[str] | None, typer.Option("--metric", "-m", help="NAME=VALUE, repeatable (e.g. -m spearman=0.84).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="A tag, repeatable.")] = None,
    note: Annotated[str | None, typer.Option("--note", help="A free-form note.")] = None,
    reuse: Annotated[
        bool, typer.Option("--reuse", help="If a version with the same files and settings exists, return it instead of adding one.")
    ] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register an artifact folder as the next version of a model."""
    from modelpress.artifacts import Artifact
    from modelpress.registry.names import validate_name

    validate_name(name)
    step_value: Any = step
    if step and step.lstrip().startswith("{"):
        try:
            step_value = json.loads(step)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"--step is not valid JSON ({exc}).", hint='Example: --step \'{"technique": "quantize", "bits": 8}\''
            ) from None
    metrics: dict[str, Any] = {}
    for item in metric or []:
        key, sep, value = item.partition("=")
        try:
            metrics[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise ConfigError(f"--metric '{item}' is not NAME=NUMBER.", hint="Example: --metric spearman=0.84")
    artifact = Artifact.open(path)
    with _open(registry) as reg:
        mv = reg.register(
            artifact, name, parent=parent, step=step_value, metrics=metrics or None, stage=stage, tags=tag or (), note=note, reuse=reuse
        )
    if as_json:
        emit_json(mv.to_json())
        return
    verb = "already registered as" if mv.reused else "registered"
    console.print(f"[green]{verb}[/green] [bold]{mv.ref}[/bold] ({mv.stage}, {mv.content_hash[:12]})", highlight=False)


@app.command()
@handle_errors
def promote(
    ref: RefArg,
    stage: Annotated[str, typer.Option("--stage", "-s", help="candidate, staging, production or archived.")] = "production",
    why: Annotated[str | None, typer.Option("--why", help="The reason, kept in the stage history.")] = None,
    who: Annotated[str | None, typer.Option("--who", help="Who decided (default: the current user).")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move a version to a stage; promoting to production archives the version that was there."""
    with _open(registry) as reg:
        mv = reg.promote(ref, stage, who=who, why=why)
    if as_json:
        emit_json(mv.to_json())
        return
    console.print(f"[green]{mv.ref}[/green] is now [bold]{mv.stage}[/bold]", highlight=False)


@app.command()
@handle_errors
def rollback(
    name: Annotated[str, typer.Argument(help="The model whose production version goes back to the previous one.")],
    why: Annotated[str | None, typer.Option("--why", help="The reason, kept in the stage history.")] = None,
    who: Annotated[str | None, typer.Option("--who", help="Who decided (default: the current user).")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put the previous production version back in production (the current one is archived)."""
    with _open(registry) as reg:
        mv = reg.rollback(name, who=who, why=why)
    if as_json:
        emit_json(mv.to_json())
        return
    console.print(f"[green]{mv.ref}[/green] is back in production", highlight=False)


@app.command()
@handle_errors
def tag(
    ref: RefArg,
    tag_: Annotated[str, typer.Argument(metavar="TAG", help="The tag, e.g. best-sts.")],
    remove: Annotated[bool, typer.Option("--remove", help="Remove the tag instead.")] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add (or --remove) a tag on a version."""
    with _open(registry) as reg:
        mv = reg.untag(ref, tag_) if remove else reg.tag(ref, tag_)
    if as_json:
        emit_json(mv.to_json())
        return
    console.print(f"{mv.ref} tags: {escape(', '.join(mv.tags) or '-')}", highlight=False)


@app.command()
@handle_errors
def note(
    ref: RefArg,
    text: Annotated[str, typer.Argument(help="The note.")],
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Attach a free-form note to a version."""
    with _open(registry) as reg:
        mv = reg.note(ref, text)
    if as_json:
        emit_json(mv.to_json())
        return
    console.print(f"noted on {mv.ref}", highlight=False)


@app.command()
@handle_errors
def delete(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION of the version to delete.")],
    force: Annotated[bool, typer.Option("--force", help="Delete even a production version or one with descendants.")] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a version (its files go when no other version shares them)."""
    with _open(registry) as reg:
        result = reg.delete(ref, force=force)
    if as_json:
        emit_json(result)
        return
    console.print(f"[green]deleted[/green] {result['deleted']}" + (" and its files" if result["files_removed"] else ""), highlight=False)


@app.command()
@handle_errors
def export(
    ref: RefArg,
    dest: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to write (must be new or empty unless --force).")],
    force: Annotated[bool, typer.Option("--force", help="Replace DIR if it exists.")] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy a version's files out of the store into DIR (atomically, every hash checked)."""
    with _open(registry) as reg:
        resolved = reg.get(ref).ref
        artifact = reg.export(resolved, dest, overwrite=force)
    if as_json:
        emit_json({"ref": resolved, "path": str(artifact.path), "content_hash": artifact.manifest.content_hash})
        return
    console.print(f"[green]exported[/green] {resolved} to {escape(str(artifact.path))}", highlight=False)


@app.command()
@handle_errors
def check(
    repair: Annotated[bool, typer.Option("--repair", help="Remove orphan and temporary folders.")] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify every stored artifact against its hashes; report (and --repair) leftovers. Exit 1 if damaged."""
    with _open(registry) as reg:
        report = reg.check(repair=repair)
    if as_json:
        emit_json(report.to_json())
    else:
        console.print(f"checked {report.artifacts_checked} artifacts of {report.versions_checked} versions", highlight=False)
        for item in report.missing:
            console.print(f"[red]missing[/red] files of {', '.join(item['versions'])} ({item['content_hash'][:12]})", highlight=False)
        for item in report.corrupt:
            console.print(f"[red]corrupt[/red] {', '.join(item['versions'])}: {', '.join(item['files'][:5])}", highlight=False)
        for p in report.orphans + report.temps:
            state = "[green]removed[/green]" if p in report.removed else "[yellow]leftover[/yellow] (run with --repair)"
            console.print(f"{state} {escape(p)}", highlight=False)
        console.print("[green]ok[/green]" if report.ok else "[red]problems found[/red]")
    if not report.ok:
        raise typer.Exit(1)
