"""Who drives a rollout when several servers share one registry, and decisions the registry has not taken yet.

* **One controller per model.** The server that starts a rollout takes the model's lease in the
  registry (:mod:`modelpress.registry.leases`) and renews it while the rollout runs; every
  decision it records carries the lease's sequence number, so a server that lost the lease
  cannot record anything. The other servers follow what the registry records: their routers
  take the recorded split (loading the versions it names), and when the holder's lease expires
  (it died, or cannot reach the registry) one of them takes it and drives the rollout from the
  recorded step. ``modelpress rollout`` commands sent to a follower answer 409 naming the holder.
* **A decision the registry did not record is never re-applied.** A rollback whose registry
  write fails keeps its traffic on the baseline (the safe state) and is written down in a local
  journal (``<home>/rollouts/``); the server retries the write, with backoff, until the registry
  takes it or has moved on, and a restarted server replays the journal before it resumes
  anything, so it never puts a breached canary split back.

Settings (environment): ``MODELPRESS_ROLLOUT_LEASE_S`` (default 15 s: how long a silent
controller keeps its rollouts; keep it well above the clock skew between servers) and
``MODELPRESS_ROLLOUT_OWNER`` (this server's id; default ``<hostname>:<port>``, so a server
restarted on the same port takes its own rollouts back at once).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Any

from modelpress.errors import ConfigError

log = logging.getLogger("modelpress.rollout")

LEASE_ENV = "MODELPRESS_ROLLOUT_LEASE_S"
OWNER_ENV = "MODELPRESS_ROLLOUT_OWNER"
DEFAULT_LEASE_S = 15.0
MIN_LEASE_S, MAX_LEASE_S = 0.5, 3600.0
MAX_SYNC_S = 1.0  # how often a server looks at the registry's rollouts at most (renew, follow, take over)
SYNCS_PER_LEASE = 3  # renewals per lease time: a missed renewal or two do not lose the lease
RETRY_MIN_S, RETRY_MAX_S = 0.2, 10.0  # an unrecorded decision is written again after these waits (doubling)


def lease_seconds(raw: str | None = None) -> float:
    """The lease time from ``raw`` or ``$MODELPRESS_ROLLOUT_LEASE_S`` (default 15 s)."""
    text = raw if raw is not None else os.environ.get(LEASE_ENV)
    if not text:
        return DEFAULT_LEASE_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or not MIN_LEASE_S <= value <= MAX_LEASE_S:
        raise ConfigError(
            f"{LEASE_ENV}={text!r} is not a number of seconds between {MIN_LEASE_S:g} and {MAX_LEASE_S:g}.",
            hint=f"Example: {LEASE_ENV}=15",
        )
    return value


def sync_seconds(lease_s: float) -> float:
    return min(MAX_SYNC_S, lease_s / SYNCS_PER_LEASE)


def default_owner(port: int | None = None) -> str:
    """``$MODELPRESS_ROLLOUT_OWNER``, else ``<hostname>:<port>`` (a random id when the port is unknown or 0)."""
    if os.environ.get(OWNER_ENV):
        return os.environ[OWNER_ENV][:256]
    host = socket.gethostname() or "localhost"
    return f"{host}:{port}" if port else f"{host}:pid{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Journal:
    """Decisions this server made that the registry has not recorded yet, one JSON file per model."""

    def __init__(self, folder: Path, owner: str) -> None:
        self.folder = folder
        self.prefix = "pending-" + re.sub(r"[^A-Za-z0-9_.-]", "_", owner)[:100] + "--"

    def _path(self, model: str) -> Path:
        return self.folder / f"{self.prefix}{model}.json"

    def write(self, model: str, doc: dict[str, Any]) -> None:
        from modelpress._fs import atomic_write_text

        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(model), json.dumps(doc))

    def remove(self, model: str) -> None:
        self._path(model).unlink(missing_ok=True)

    def read_all(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if not self.folder.is_dir():
            return out
        for path in sorted(self.folder.glob(f"{self.prefix}*.json")):
            try:
                doc = json.loads(path.read_text())
                out[str(doc["model"])] = doc
            except (OSError, ValueError, KeyError, TypeError):  # a damaged entry: say so, keep the rest
                log.exception("the unrecorded rollout decision in %s cannot be read", path)
        return out


def journal_for(owner: str) -> Journal:
    from modelpress.locations import home_dir

    return Journal(home_dir() / "rollouts", owner)


__all__ = ["DEFAULT_LEASE_S", "LEASE_ENV", "OWNER_ENV", "Journal", "default_owner", "journal_for", "lease_seconds", "sync_seconds"]
