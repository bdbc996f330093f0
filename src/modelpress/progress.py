"""The progress-callback type every long-running function takes, and the one that shows nothing.

A :data:`ProgressFactory` is called once per stage with a description and the number of units
(None when unknown) and returns a function to call with each batch of units done::

    def run(progress: ProgressFactory = no_progress) -> None:
        advance = progress("evaluating", 1500)
        for batch in batches:
            ...
            advance(len(batch))

The CLI passes :func:`rich_bars` (through ``modelpress.cli.common.progress_bars``); Python callers
get silence, except the zoo, which shows its one-time training with bars.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

ProgressFactory = Callable[[str, int | None], Callable[[int], None]]

__all__ = ["ProgressFactory", "no_progress", "rich_bars"]


def _ignore(_n: int) -> None:
    return None


def no_progress(_desc: str, _total: int | None) -> Callable[[int], None]:
    """A :data:`ProgressFactory` that shows nothing."""
    return _ignore


@contextlib.contextmanager
def rich_bars(console: Any = None) -> Iterator[ProgressFactory]:
    """A :data:`ProgressFactory` drawing one Rich bar per stage on ``console`` (default: stderr); bars vanish when done."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console if console is not None else Console(stderr=True),
        transient=True,
    ) as prog:

        def factory(desc: str, total: int | None) -> Callable[[int], None]:
            tid = prog.add_task(desc, total=total)
            return lambda n: prog.advance(tid, n)

        yield factory
