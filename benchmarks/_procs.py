"""The processes a benchmark starts, and the machine load around what it measures.

``Procs`` owns every server a benchmark starts (our ``modelpress serve``, LitServe, Ray Serve):
each runs in a session of its own, and is ended as a whole group (SIGTERM, then SIGKILL after a
grace period) when the benchmark leaves its ``with`` block, exits through ``atexit``, or gets
SIGTERM/SIGHUP (turned into ``SystemExit``) or Ctrl-C (``KeyboardInterrupt``). Every process it
starts carries ``MODELPRESS_BENCH_OWNER=<id>`` in its environment, which its descendants inherit,
so what escapes its group (a daemon calling ``setsid``, a worker re-parented to init) is still
found and ended. A Ray cluster the benchmark started is shut down with ``ray stop`` first, unless
another Ray cluster runs on the machine (``ray stop`` would end it too).

``load_section`` prints the 1-minute load average before and after a measured section, and warns
when it was above 1 before: figures measured beside other load are marked as such.
``leftovers``/``end_all`` let ``run.py`` check that a benchmark left nothing of its own behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

OWNER_ENV = "MODELPRESS_BENCH_OWNER"  # set per Procs: every process it starts, and their descendants
RUN_ENV = "MODELPRESS_BENCH_RUN"  # set by run.py (or a test) around a whole benchmark script
GRACE_S = 10.0
LOAD_WARN = 1.0
RAY_DAEMONS = ("raylet", "gcs_server")  # every Ray cluster has these two


# -- finding processes -----------------------------------------------------------------------------
def _env_of(p: psutil.Process) -> dict[str, str]:
    try:
        return p.environ()
    except (psutil.Error, OSError):
        return {}


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tagged(var: str, value: str) -> list[psutil.Process]:
    """Live processes (not zombies, not this one or its ancestors) whose environment has ``var=value``."""
    skip = {os.getpid(), *(a.pid for a in psutil.Process().parents())}
    return [p for p in psutil.process_iter() if p.pid not in skip and alive(p) and _env_of(p).get(var) == value]


def group_members(leader: int) -> list[psutil.Process]:
    """Live processes in the session or process group ``leader`` started, and its descendants."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if leader in (os.getsid(p.pid), os.getpgid(p.pid)) and alive(p):
                found[p.pid] = p
        except (OSError, psutil.Error):
            continue
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(leader).children(recursive=True):
            if alive(p):
                found[p.pid] = p
    found.pop(os.getpid(), None)
    return list(found.values())


def describe(procs: list[psutil.Process]) -> str:
    lines = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            lines.append(f"  pid {p.pid} (ppid {p.ppid()}): {' '.join(p.cmdline())[:200] or p.name()}")
    return "\n".join(lines)


def end_processes(procs: list[psutil.Process], groups: Sequence[int] = (), grace: float = GRACE_S) -> list[psutil.Process]:
    """SIGTERM to ``groups`` and ``procs``, SIGKILL to what is left after ``grace`` s; returns what survived even that."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for g in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)
        procs = [p for p in procs if alive(p)]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        deadline = time.monotonic() + wait
        while procs and time.monotonic() < deadline:
            _, procs = psutil.wait_procs(procs, timeout=0.2)
            procs = [p for p in procs if alive(p)]
        if not procs:
            return []
    return procs


def leftovers(var: str, value: str, grace: float = 5.0) -> list[psutil.Process]:
    """Processes tagged ``var=value`` still running ``grace`` s from now (shutdowns in progress may finish)."""
    deadline = time.monotonic() + grace
    left = tagged(var, value)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = tagged(var, value)
    return left


# -- the load around a measured section ------------------------------------------------------------
LOAD_LOG: list[dict[str, Any]] = []


def wait_ready(url: str, proc: Any, timeout: float = 600.0, *, interval: float = 0.5, log: Any = None) -> None:
    """Poll ``url`` (a health route) until it answers 200; a ``RuntimeError`` when ``proc`` exits first or
    ``timeout`` seconds pass, ending with the last 3,000 characters of ``log`` (a path) when given.
    The benchmarks and the tests that start ``modelpress serve`` wait with this one poll."""
    import httpx

    def tail() -> str:
        return f": {Path(log).read_text()[-3000:]}" if log is not None else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready{tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:g} s{tail()}")


def load1() -> float:
    return os.getloadavg()[0]


@contextlib.contextmanager
def load_section(name: str, out: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
    """Print the 1-minute load average before and after a measured section; warn when it was above 1 before."""
    rec: dict[str, Any] = {"section": name, "load_before": load1()}
    LOAD_LOG.append(rec)
    out(f"[load] before {name}: 1-min load average {rec['load_before']:.2f}")
    if rec["load_before"] > LOAD_WARN:
        rec["busy"] = True
        out(
            f"[load] WARNING: load average {rec['load_before']:.2f} > {LOAD_WARN:g} before {name}: "
            "its figures are measured beside other load (check for stray processes: ps -eo pid,pcpu,args --sort=-pcpu | head)"
        )
    try:
        yield rec
    finally:
        rec["load_after"] = load1()
        out(f"[load] after {name}: 1-min load average {rec['load_after']:.2f}")


def busy_sections() -> list[str]:
    return [f"{r['section']} ({r['load_before']:.2f})" for r in LOAD_LOG if r.get("busy")]


# -- owning the processes a benchmark starts ------------------------------------------------------
class Procs:
    """Every process a benchmark starts: each in its own session, all ended on every way out."""

    def __init__(self, out: Callable[[str], None] = print) -> None:
        self.tag = uuid.uuid4().hex
        self.out = out
        self.started: list[subprocess.Popen] = []
        self.before_stop: list[Callable[[], None]] = []
        self.closed = False
        self._old_handlers: dict[int, Any] = {}
        atexit.register(self.close)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally and __exit__, then close()

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, **(extra or {}), OWNER_ENV: self.tag}

    def popen(self, cmd: list[str], *, on_stop: Callable[[], None] | None = None, **kw: Any) -> subprocess.Popen:
        """``subprocess.Popen`` in a new session (its own process group), tagged, ended by ``close``."""
        if self.closed:
            raise RuntimeError("this Procs is closed: it starts nothing more")
        kw["env"] = self.env(kw.get("env"))
        proc = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.started.append(proc)
        if on_stop is not None:
            self.before_stop.append(on_stop)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = GRACE_S) -> None:
        """End ``proc``'s whole group (and what escaped it from its descendants), then reap it."""
        left = end_processes(group_members(proc.pid), [proc.pid], grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if left:
            self.out(f"could not end these processes of {proc.args[:2]}:\n{describe(left)}")

    def close(self) -> list[psutil.Process]:
        """End everything started here; returns what had escaped its group (it was ended too)."""
        if self.closed:
            return []
        self.closed = True
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut the cleanup short
            with contextlib.suppress(ValueError):
                old[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            for hook in self.before_stop:
                try:
                    hook()
                except Exception as exc:  # noqa: BLE001 - a failed graceful stop still ends the groups below
                    self.out(f"a graceful stop failed ({exc!r}); ending the process groups")
            for proc in self.started:
                self.stop(proc)
            escaped = tagged(OWNER_ENV, self.tag)
            if escaped:
                self.out(f"these processes had left their process group; ending them:\n{describe(escaped)}")
                end_processes(escaped)
            return escaped
        finally:
            for sig, handler in {**old, **self._old_handlers}.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Ray ---------------------------------------------------------------------------------------
    def ray_stopper(self, ray_cli: str) -> Callable[[], None]:
        """A hook running ``ray stop`` for the cluster this benchmark started, when no other Ray cluster runs here."""

        def stop_ray() -> None:
            daemons = [p for p in psutil.process_iter() if alive(p) and any(d in _name(p) for d in RAY_DAEMONS)]
            others = [p for p in daemons if _env_of(p).get(OWNER_ENV) != self.tag]
            if not daemons:
                return
            if others:
                self.out(
                    f"another Ray cluster runs on this machine (pids {[p.pid for p in others]}): `ray stop` would end it too, "
                    "so only this benchmark's Ray processes are ended"
                )
                return
            done = subprocess.run([ray_cli, "stop", "--grace-period", "10"], capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                self.out(f"`ray stop` exited with {done.returncode}: {(done.stderr or done.stdout)[-500:]}")

        return stop_ray


def _name(p: psutil.Process) -> str:
    try:
        return p.name() + " " + " ".join(p.cmdline()[:2])
    except psutil.Error:
        return ""


def main_guard(main: Callable[[], int]) -> int:
    """Run a benchmark's ``main``: Ctrl-C prints one line instead of a traceback and exits with 130."""
    try:
        return main()
    except KeyboardInterrupt:
        print("\ninterrupted: the processes this benchmark started were ended", file=sys.stderr)
        return 130
