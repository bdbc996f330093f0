"""The zoo's mnist-cnn, built once per test session into the session's temporary MODELPRESS_HOME."""

from __future__ import annotations

import pytest


class StageLog:
    """A progress factory that records each stage and how far it got."""

    def __init__(self) -> None:
        self.stages: dict[str, list[int]] = {}

    def __call__(self, desc: str, total: int | None):
        self.stages[desc] = [0, total or 0]

        def advance(n: int) -> None:
            self.stages[desc][0] += n

        return advance


@pytest.fixture(scope="session")
def mnist_build(data_dir):
    """(artifact, stage log, messages) of building mnist-cnn with the default recipe (about 20 s)."""
    from modelpress import zoo

    log, messages = StageLog(), []
    art = zoo.build("mnist-cnn", data_dir=data_dir, progress=log, announce=messages.append)
    return art, log, messages
