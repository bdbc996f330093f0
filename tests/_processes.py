"""The processes the tests start: each in a session of its own, ended as a group; and finding what is left.

``popen_group`` / ``run_group`` are ``subprocess.Popen`` / ``subprocess.run`` in a new session
whose ``terminate``/``kill`` (and a ``run_group`` timeout) signal the whole group, so a server's
workers or a browser's helpers end with it. ``strays`` finds the processes a test session left:
descendants of the pytest process, processes carrying the session's mark in their environment
(every child inherits it, even one that moved to another session or was re-parented to init), and
members of the groups ``popen_group`` created; processes alive before the session started
(PostgreSQL, Redis and other services of the machine) never count.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
from pathlib import Path
from typing import Any

import psutil


def _bench_procs() -> Any:
    """benchmarks/_procs.py: the one place that ends process groups, for the benchmarks and the tests."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "_procs.py"
    spec = importlib.util.spec_from_file_location("modelpress_bench_procs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_procs = _bench_procs()
alive = _procs.alive  # running and not a zombie
wait_ready = _procs.wait_ready  # poll a started server's health route until it answers 200


def end(procs: list[psutil.Process], groups: tuple[int, ...] = (), grace: float = 5.0) -> list[psutil.Process]:
    """SIGTERM to ``groups`` and ``procs``, SIGKILL after ``grace`` s; returns what survived even that."""
    return _procs.end_processes(procs, groups, grace)


MARK_ENV = "MODELPRESS_TEST_RUN"
CREATED_GROUPS: set[int] = set()  # sessions popen_group started (the leader's pid is the group and session id)
# Helpers that the pytest process itself starts and that exit with it; not strays while their parent is pytest.
OWN_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "torch/_inductor/compile_worker/")


def env_of(p: psutil.Process) -> dict[str, str]:
    try:
        return p.environ()
    except (psutil.Error, OSError):
        return {}


def key(p: psutil.Process) -> tuple[int, float]:
    """A process's identity across pid reuse."""
    try:
        return p.pid, p.create_time()
    except psutil.Error:
        return p.pid, 0.0


def snapshot() -> set[tuple[int, float]]:
    """Every process alive now."""
    return {key(p) for p in psutil.process_iter()}


def marked(var: str, value: str) -> list[psutil.Process]:
    """Live processes (not this one) whose environment has ``var=value``."""
    return [p for p in psutil.process_iter() if p.pid != os.getpid() and alive(p) and env_of(p).get(var) == value]


def describe(procs: list[psutil.Process]) -> str:
    lines = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            lines.append(f"  pid {p.pid} (ppid {p.ppid()}, session {os.getsid(p.pid)}): {' '.join(p.cmdline())[:200] or p.name()}")
    return "\n".join(lines)


def _own_helper(p: psutil.Process, root: int) -> bool:
    """A helper of the pytest process itself (a chain of OWN_HELPERS up to it): it exits with pytest."""
    try:
        while p.pid != root:
            if not any(h in " ".join(p.cmdline()) for h in OWN_HELPERS):
                return False
            p = p.parent()
            if p is None:
                return False
        return True
    except psutil.Error:
        return False


def strays(root: int, mark: str, before: set[tuple[int, float]]) -> list[psutil.Process]:
    """What the tests of a session (run in process ``root``, children marked ``mark``) left running."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(root).children(recursive=True):
            found[p.pid] = p
    for p in psutil.process_iter():
        try:
            if env_of(p).get(MARK_ENV) == mark or os.getsid(p.pid) in CREATED_GROUPS or os.getpgid(p.pid) in CREATED_GROUPS:
                found[p.pid] = p
        except (OSError, psutil.Error):
            continue
    skip = {root, *(a.pid for a in psutil.Process(root).parents())}
    return [p for p in found.values() if p.pid not in skip and key(p) not in before and alive(p) and not _own_helper(p, root)]


def group_members(leader: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if leader in (os.getsid(p.pid), os.getpgid(p.pid)) and p.pid != os.getpid() and alive(p):
                out.append(p)
        except (OSError, psutil.Error):
            continue
    return out


class GroupPopen(subprocess.Popen):
    """A ``Popen`` in a session of its own: ``terminate``/``kill`` signal its whole process group."""

    def __init__(self, args: Any, **kw: Any) -> None:
        kw["start_new_session"] = True
        super().__init__(args, **kw)
        CREATED_GROUPS.add(self.pid)

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        self.poll()

    def end_group(self, grace: float = 5.0) -> None:
        """End every process of the group (the leader may have exited already), then reap the leader."""
        end(group_members(self.pid), (self.pid,), grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(5)

    def __exit__(self, *exc: object) -> None:
        try:
            self.end_group()
        finally:
            super().__exit__(*exc)


def popen_group(args: Any, **kw: Any) -> GroupPopen:
    return GroupPopen(args, **kw)


def run_group(args: Any, *, timeout: float, capture_output: bool = False, **kw: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own; the whole group is ended when it returns or times out."""
    if capture_output:
        kw["stdout"] = kw["stderr"] = subprocess.PIPE
    with popen_group(args, **kw) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
