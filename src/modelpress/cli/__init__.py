"""The ``modelpress`` command line: the only package that uses Typer.

``common`` holds the shared options, error handling and progress bars; ``main`` the root app and
the model verbs (info, evaluate, bench, export, run, datasets, tasks, zoo); one module per verb group
(optimize, prune, distill, registry, serve, rollout, alerts, ship).
"""

from modelpress.cli.main import app, main

__all__ = ["app", "main"]
