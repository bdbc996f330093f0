"""Rollout leases: which server drives the rollout of a deployment, one at a time across servers.

Several servers on one registry serve the same model; only the holder of the model's lease
decides (advances, promotes, rolls back), the others follow what the registry records. A lease
is one ``rollout_leases`` row: ``owner`` (a server id), ``expires_at`` (seconds since the epoch,
on the holder's clock: keep the lease time well above the clock skew between servers) and
``seq``, a number that changes whenever the lease changes hands.

    with Registry(url) as reg:
        lease = reg.leases.acquire("minilm", "host-a:8000", ttl_s=15)   # a Lease, or None: someone else holds it
        lease = reg.leases.renew(lease, ttl_s=15)                        # None: lost (it expired and was taken)
        reg.leases.release(lease)

Each of acquire, renew and release is one transaction that changes the row only when its
``seq`` (and owner) is still the one read: a compare-and-set, so of two servers racing for a
free or expired lease exactly one gets it. ``seq`` does not change on renew, so it is a fencing
token: a write made under ``(owner, seq)`` (:meth:`Leases.check_held`, which
``reg.rollouts.save(..., lease=...)`` runs in its own transaction) fails once anyone else has
acquired the lease since, even if the old holder was paused past its expiry and never noticed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from modelpress.errors import ConfigError, RolloutConflictError
from modelpress.registry.db import LeaseRow
from modelpress.registry.names import validate_name

MAX_LEASE_S = 3600.0  # a lease longer than an hour would leave a dead server's rollout stuck for that long
MAX_OWNER_CHARS = 256  # the owner column's width


class LeaseLostError(RolloutConflictError):
    """A write under a lease that another server has acquired since (or that was released). HTTP 409."""


@dataclass(frozen=True)
class Lease:
    """One holder's view of a lease: ``seq`` is the fencing token its writes carry."""

    name: str
    owner: str | None
    seq: int
    expires_at: float | None

    def expired(self, now: float | None = None) -> bool:
        return self.owner is None or self.expires_at is None or self.expires_at <= (time.time() if now is None else now)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "owner": self.owner, "seq": self.seq, "expires_at": self.expires_at}


def _check(owner: str, ttl_s: float) -> None:
    if not isinstance(owner, str) or not owner.strip() or len(owner) > MAX_OWNER_CHARS:
        raise ConfigError(f"A lease owner must be 1 to {MAX_OWNER_CHARS} characters, not {owner!r}.", hint='Example: "host-a:8000"')
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not math.isfinite(ttl_s) or not 0 < ttl_s <= MAX_LEASE_S:
        raise ConfigError(f"A lease time must be between 0 and {MAX_LEASE_S:g} seconds, not {ttl_s!r}.", hint="Example: ttl_s=15")


def _row(s: Any, name: str, *, lock: bool = False) -> tuple[str | None, float | None, int] | None:
    q = select(LeaseRow.owner, LeaseRow.expires_at, LeaseRow.seq).where(LeaseRow.name == name)
    got = s.execute(q.with_for_update() if lock else q).first()
    return (got[0], got[1], got[2]) if got is not None else None


def check_held(s: Any, name: str, owner: str, seq: int) -> None:
    """In transaction ``s``: raise :class:`LeaseLostError` unless ``owner`` still holds lease ``name`` at ``seq``.

    The row is locked (PostgreSQL), so no acquire can slip in before ``s`` commits; SQLite
    write transactions are serialised anyway. An expiry that passed unnoticed is no reason to
    fail: while ``seq`` is unchanged nobody else has acted.
    """
    got = _row(s, name, lock=True)
    if got is None or got[0] != owner or got[2] != seq:
        now_owner = got[0] if got is not None else None
        raise LeaseLostError(
            f"The rollout lease of '{name}' is no longer held by {owner} (it is now {now_owner or 'free'}, "
            f"sequence {got[2] if got else 0}, not {seq}); the change was not recorded.",
            hint="Another server took over the rollout; it decides from here. Send rollout commands to it.",
        )


class Leases:
    """The lease API of one :class:`~modelpress.registry.api.Registry` (``reg.leases``)."""

    def __init__(self, registry: Any) -> None:
        self.reg = registry

    def get(self, name: str) -> Lease | None:
        """The lease of ``name`` as recorded (None: never acquired)."""
        name = validate_name(name)
        got = self.reg._read(lambda s: _row(s, name))
        return Lease(name, got[0], got[2], got[1]) if got is not None else None

    def acquire(self, name: str, owner: str, ttl_s: float, *, now: float | None = None) -> Lease | None:
        """Take lease ``name`` for ``ttl_s`` seconds when it is free, expired or already ``owner``'s; else None.

        Taking it (even back from an earlier run of the same owner) gives it a new ``seq``.
        """
        name = validate_name(name)
        _check(owner, ttl_s)
        at = time.time() if now is None else float(now)

        def run(s: Any) -> Lease | None:
            got = _row(s, name)
            if got is None:  # the first holder; a racing insert fails on the key and the retry sees its row
                s.add(LeaseRow(name=name, owner=owner, expires_at=at + ttl_s, seq=1))
                s.flush()
                return Lease(name, owner, 1, at + ttl_s)
            held_by, expires, seq = got
            if held_by not in (None, owner) and expires is not None and expires > at:
                return None
            done = s.execute(
                update(LeaseRow)
                .where(LeaseRow.name == name, LeaseRow.seq == seq)
                .values(owner=owner, expires_at=at + ttl_s, seq=seq + 1)
                .execution_options(synchronize_session=False)
            )
            return Lease(name, owner, seq + 1, at + ttl_s) if done.rowcount == 1 else None

        return self.reg._write(run)

    def renew(self, lease: Lease, ttl_s: float, *, now: float | None = None) -> Lease | None:
        """Extend ``lease`` by ``ttl_s`` from now if it is still its owner's at its ``seq``; None when it was lost."""
        if lease.owner is None:
            return None
        _check(lease.owner, ttl_s)
        at = time.time() if now is None else float(now)

        def run(s: Any) -> Lease | None:
            done = s.execute(
                update(LeaseRow)
                .where(LeaseRow.name == lease.name, LeaseRow.owner == lease.owner, LeaseRow.seq == lease.seq)
                .values(expires_at=at + ttl_s)
                .execution_options(synchronize_session=False)
            )
            return Lease(lease.name, lease.owner, lease.seq, at + ttl_s) if done.rowcount == 1 else None

        return self.reg._write(run)

    def release(self, lease: Lease) -> bool:
        """Give ``lease`` up (anyone may take it at once); False when it was no longer held at its ``seq``."""

        def run(s: Any) -> bool:
            done = s.execute(
                update(LeaseRow)
                .where(LeaseRow.name == lease.name, LeaseRow.owner == lease.owner, LeaseRow.seq == lease.seq)
                .values(owner=None, expires_at=None, seq=lease.seq + 1)
                .execution_options(synchronize_session=False)
            )
            return done.rowcount == 1

        return self.reg._write(run)


__all__ = ["MAX_LEASE_S", "Lease", "LeaseLostError", "Leases", "check_held"]
