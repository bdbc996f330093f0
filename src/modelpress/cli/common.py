"""What every CLI module shares: the consoles, common options, error handling, progress bars, JSON output,
and the silencing of third-party libraries' noise (shown again with ``modelpress --verbose``)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from modelpress.errors import ConfigError, ModelpressError
from modelpress.progress import ProgressFactory, no_progress, rich_bars

# -- third-party noise ----------------------------------------------------------------------
# Lines that libraries log on import or while exporting although the user did nothing wrong.
# Each entry names the logger and the message it hides; everything else those loggers say
# still shows. Installed when the CLI is imported, before any command imports torch.
THIRD_PARTY_NOISE: tuple[tuple[str, str], ...] = (
    # torchao tries to load its CUDA kernel libraries on every import; a CPU-only torch cannot.
    ("torchao", r"Failed to load .*\.so"),
    # torchao registers its Enums with pytree.register_constant, deprecated since torch 2.13.
    ("torch.utils._pytree", r".* is an Enum subclass and is now natively supported by torch\.compile"),
    # torch.onnx's exporter registers onnxscript's torchvision ops and logs each one it skips.
    ("torch.onnx._internal.exporter._registration", r"torchvision is not installed\. Skipping torchvision::"),
)
# Python warnings of the same kind: (message, category, module that issues it).
THIRD_PARTY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # torch.compile's inductor, lowering a static-int8 model (the tuner's torch candidates), copies a tensor with torch.tensor(t).
    ("To copy construct from a tensor", UserWarning, r"torch\._inductor\.mkldnn_lowerings"),
)


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message matches a pattern."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


_installed: list[tuple[logging.Logger, logging.Filter]] = []
_warning_filters: list[Any] = []


def hide_third_party_noise() -> None:
    """Install the filters of :data:`THIRD_PARTY_NOISE` and :data:`THIRD_PARTY_WARNINGS` (once)."""
    if _installed:
        return
    for name, pattern in THIRD_PARTY_NOISE:
        logger, dropper = logging.getLogger(name), _DropMessage(pattern)
        logger.addFilter(dropper)
        _installed.append((logger, dropper))
    for message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
        _warning_filters.append(warnings.filters[0])


def show_third_party_noise() -> None:
    """Remove those filters: ``modelpress --verbose``."""
    while _installed:
        logger, dropper = _installed.pop()
        logger.removeFilter(dropper)
    while _warning_filters:  # called by the root callback, before any command has issued a warning
        entry = _warning_filters.pop()
        if entry in warnings.filters:
            warnings.filters.remove(entry)


hide_third_party_noise()

console = Console(stderr=True)
# Tables are wide: when stdout is not a terminal (make run, a log file), do not wrap them at 80 columns.
out = Console() if sys.stdout.isatty() else Console(width=160)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", help="Also show what third-party libraries log on import and export (hidden by default).")
]
TaskOpt = Annotated[
    str | None,
    typer.Option("--task", "-t", help="embedding, text-classification, image-classification, causal-lm (inferred when omitted)."),
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="Threads for the runtime (default: all cores).")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Data folder (default: $MODELPRESS_DATA, then ../shared/data).")]
TokOpt = Annotated[str | None, typer.Option("--tokenizer", help="Hugging Face folder with the tokenizer, for ONNX files and modules.")]


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a modelpress error as a message (no traceback) and exit with its code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ModelpressError as exc:
            # names and paths may hold '[': escape them so that Rich prints them as they are
            console.print(f"[bold red]error:[/bold red] [red]{escape(exc.message)}[/red]", highlight=False, soft_wrap=True)
            if exc.hint:
                console.print(f"[yellow]hint:[/yellow] {escape(exc.hint)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None

    return wrapper


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[ProgressFactory]:
    """A progress factory for the API verbs: a Rich bar per stage, on stderr."""
    if not enabled:
        yield no_progress
        return
    with rich_bars(console) as factory:
        yield factory


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def parse_kv(items: list[str] | None, what: str, example: str) -> dict[str, Any]:
    outd: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{what} '{item}' is not KEY=VALUE.", hint=f"Example: {example}")
        k, v = item.split("=", 1)
        try:
            outd[k] = json.loads(v)
        except json.JSONDecodeError:
            outd[k] = v
    return outd
