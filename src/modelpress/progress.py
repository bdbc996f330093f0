"""The progress-callback type every long-running function takes, and the one that shows nothing.

A :data:`ProgressFactory` is called once per stage with a description and the number of units
(None when unknown) and returns a function to call with each batch of units done::

    def run(progress: ProgressFactory = no_progress) -> None:
        advance = progress("evaluating", 1500)
        for batch in batches:
            ...
            advance(len(batch))

The CLI passes Rich bars (``modelpress.cli.common.progress_bars``); Python callers get silence.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFactory = Callable[[str, int | None], Callable[[int], None]]

__all__ = ["ProgressFactory", "no_progress"]


def _ignore(_n: int) -> None:
    return None


def no_progress(_desc: str, _total: int | None) -> Callable[[int], None]:
    """A :data:`ProgressFactory` that shows nothing."""
    return _ignore
