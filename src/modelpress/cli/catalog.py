"""The catalog commands: ``modelpress datasets``, ``tasks`` and ``zoo`` (what is there to use, and the zoo's builds)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from modelpress.cli.common import DataDirOpt, JsonOpt, console, emit_json, handle_errors, out, progress_bars
from modelpress.errors import ConfigError


def datasets_cmd(as_json: JsonOpt = False) -> None:
    """List the named datasets (read from the data folder)."""
    from modelpress import api
    from modelpress.locations import find_data_dir

    data = api.list_datasets()
    if as_json:
        emit_json(data)
        return
    where = find_data_dir()
    out.print(f"data folder: {where or 'none found (set MODELPRESS_DATA or --data-dir)'}")
    for k, v in data.items():
        out.print(f"  [bold]{k}[/bold]  {v}")


def tasks_cmd(as_json: JsonOpt = False) -> None:
    """List the tasks and how each is scored."""
    from modelpress import api

    data = api.list_tasks()
    if as_json:
        emit_json(data)
        return
    for k, v in data.items():
        out.print(f"  [bold]{k}[/bold]  {v}")


def zoo_cmd(
    name: Annotated[
        str | None, typer.Argument(help="A zoo model to build unless cached (mnist-cnn, minilm-sst2, or all); none: list them.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Train NAME again even when it is cached.")] = False,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the models modelpress trains itself (cached, with their measured quality), or build one."""
    from modelpress import zoo

    if name is None and force:
        raise ConfigError("--force needs the model to train again.", hint="Example: modelpress zoo mnist-cnn --force")
    names = list(zoo.ZOO) if name == "all" else [name] if name else []
    for n in names:
        with progress_bars(not as_json or sys.stderr.isatty()) as prog:
            zoo.build(n, force=force, data_dir=data_dir, progress=prog, announce=None if as_json else console.print)
    rows = [r for r in zoo.list_models() if not names or r["name"] in names]
    if as_json:
        emit_json(rows if name in (None, "all") else rows[0])
        return
    from rich.table import Table

    table = Table(title="modelpress zoo", title_justify="left")
    for col in ("name", "quality (target)", "trained in", "folder"):
        table.add_column(col, overflow="fold")
    for r in rows:
        quality = f"{r['metric']} {r['quality']:.4f} on {r['dataset']}" if r["built"] else "[dim]not built[/dim]"
        trained = f"{r['train_seconds']:.0f} s" if r["train_seconds"] is not None else "-"
        table.add_row(
            r["name"], f"{quality} ({r['target']})", trained, r["path"] if r["built"] else f"[dim]modelpress zoo {r['name']}[/dim]"
        )
    out.print(table)


def register_commands(app: typer.Typer) -> None:
    app.command("datasets")(handle_errors(datasets_cmd))
    app.command("tasks")(handle_errors(tasks_cmd))
    app.command("zoo")(handle_errors(zoo_cmd))
