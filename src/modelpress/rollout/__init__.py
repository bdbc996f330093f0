"""Rollouts: canary, shadow, blue-green and A/B on a running model server, decided by live numbers.

    from modelpress.rollout import RolloutServer, serve
    server = RolloutServer(config)   # the model server with rollouts, their API (/rollouts) and the dashboard
    serve(config)                    # what `modelpress serve` runs

The package sits above :mod:`modelpress.serving` and plugs into it through the server's
extension point (:mod:`modelpress.rollout.extension`). Modules: ``spec`` (strategies and
phases), ``controller`` (the manager), ``watch`` (one rollout's window loop), ``rollback``,
``routing`` (split and shadow policies), ``observations``, ``statistics``, ``analysis``
(agreement, verdicts, the A/B report), ``shadow``, ``api``, ``dashboard``, ``alerts``,
``client`` (the management API's HTTP client).
"""

from __future__ import annotations

from typing import Any

_LAZY = {"RolloutExtension", "RolloutServer", "serve", "with_rollouts"}  # the server stack loads only when asked for


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from modelpress.rollout import extension

        return getattr(extension, name)
    raise AttributeError(f"module 'modelpress.rollout' has no attribute '{name}'")


__all__ = ["RolloutExtension", "RolloutServer", "serve", "with_rollouts"]
