"""CPU time of a server's process tree, read from /proc, for CPU milliseconds per request.

A server is a root process, every descendant of it, and every process whose environment carries
a mark (``var=value``) that the benchmark set when it started the root: Ray's daemons and
workers inherit it even where they leave the root's tree. Each sample reads, for each such
process, ``utime + stime + cutime + cstime`` from ``/proc/PID/stat`` (its own CPU in user and
kernel mode, every thread of it, plus the CPU of its children that it has waited for), keyed by
(pid, start time) so that a reused pid is a new process. The CPU between two samples is the sum
of each process's growth (a process born in between counts whole). What a process that ended in
between had used since the first sample is lost unless its parent waited for it (then it is in
the parent's ``cutime``); servers under steady load do not start and end processes per request.

The kernel counts these times in clock ticks (``SC_CLK_TCK``, 100 per second on Linux): 10 ms
per process per sample, so a figure needs a window of at least a few hundred ticks (seconds of
load) to be read to within a percent or two.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")
SETTLE_STEP_S = 0.05  # how often settle() looks at a server's CPU
SETTLE_QUIET_TICKS = 1  # a step in which the tree used at most this many ticks is quiet (idle daemons tick now and then)
SETTLE_MAX_S = 2.0  # settle() gives up waiting for a quiet step after this long (a server with busy background threads)

Key = tuple[int, int]  # (pid, start time in ticks since boot): a process's identity across pid reuse


@dataclass(frozen=True)
class Stat:
    pid: int
    ppid: int
    start: int
    ticks: int  # utime + stime + cutime + cstime


def read_stat(pid: int) -> Stat | None:
    """One process's ``/proc/PID/stat``; None when it has ended (or is not readable)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')': split after the last ')'
    f = text[text.rindex(")") + 2 :].split()
    # f[0] is field 3 (state): ppid is field 4, utime..cstime fields 14-17, starttime field 22
    return Stat(pid=pid, ppid=int(f[1]), start=int(f[19]), ticks=int(f[11]) + int(f[12]) + int(f[13]) + int(f[14]))


def _pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def _has_mark(pid: int, mark: bytes) -> bool:
    try:
        return mark in (PROC / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


class ProcessTree:
    """A server's processes: ``root``, its descendants, and the processes marked ``env`` (``(VAR, value)``)."""

    def __init__(self, root: int, env: tuple[str, str] | None = None) -> None:
        self.root = root
        self.mark = f"{env[0]}={env[1]}".encode() if env else None
        self._marked: dict[Key, bool] = {}  # an environment does not change: each process's is read once

    def stats(self) -> list[Stat]:
        """Every process of the tree running now."""
        stats = {s.pid: s for s in (read_stat(p) for p in _pids()) if s is not None}
        children: dict[int, list[int]] = {}
        for s in stats.values():
            children.setdefault(s.ppid, []).append(s.pid)
        found: set[int] = set()
        todo = [self.root] if self.root in stats else []
        if self.mark is not None:
            for s in stats.values():
                key = (s.pid, s.start)
                if key not in self._marked:
                    self._marked[key] = s.pid != os.getpid() and _has_mark(s.pid, self.mark)
                if self._marked[key]:
                    todo.append(s.pid)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, ()))
        return [stats[p] for p in sorted(found)]

    def sample(self) -> dict[Key, int]:
        """Ticks used so far by each process of the tree."""
        return {(s.pid, s.start): s.ticks for s in self.stats()}

    def settle(self) -> dict[Key, int]:
        """A sample taken once the tree has gone quiet (the requests a load generator left in flight are done)."""
        last = self.sample()
        deadline = time.monotonic() + SETTLE_MAX_S
        while time.monotonic() < deadline:
            time.sleep(SETTLE_STEP_S)
            now = self.sample()
            if ticks_between(last, now) <= SETTLE_QUIET_TICKS:
                return now
            last = now
        return last

    def send(self, sig: int) -> None:
        """Send ``sig`` to every process of the tree (one that ended meanwhile is skipped)."""
        for s in self.stats():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(s.pid, sig)


class Pauser:
    """Holds every server but the one being measured stopped (SIGSTOP), so that no idle server's background work
    (Ray's daemons and health checks, LitServe's polling workers) runs beside another's figures.

    ``only(tree)`` stops every other tree, then continues ``tree``; ``only(None)`` stops them all (the in-process
    reference runs alone); leaving the ``with`` block continues every tree, so that the servers can be ended."""

    def __init__(self, trees: Iterable[ProcessTree], *, enabled: bool = True) -> None:
        self.trees = list({id(t): t for t in trees}.values())  # targets of one server share its tree
        self.enabled = enabled

    def only(self, running: ProcessTree | None) -> None:
        if not self.enabled:
            return
        for t in self.trees:
            if t is not running:
                t.send(signal.SIGSTOP)
        if running is not None:
            running.send(signal.SIGCONT)

    @contextlib.contextmanager
    def holding(self) -> Iterator[Pauser]:
        try:
            yield self
        finally:
            for t in self.trees:
                t.send(signal.SIGCONT)


def ticks_between(before: dict[Key, int], after: dict[Key, int]) -> int:
    """Ticks the processes used between two samples (a process first seen in ``after`` counts whole)."""
    return sum(max(0, t - before.get(k, 0)) for k, t in after.items())


def seconds_between(before: dict[Key, int], after: dict[Key, int]) -> float:
    return ticks_between(before, after) / CLK_TCK
