"""benchmarks/_cpu.py: a server's CPU read from /proc covers its children, its grandchildren, and marked processes
that left its tree, and counts nothing of processes outside it."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")

BURN_S = 0.6  # CPU seconds each burning process uses
# The kernel counts CPU in clock ticks (10 ms at 100 Hz) per process, and a busy machine slows nothing but wall time:
# measured CPU is within a few ticks of what the processes report for themselves.
TICKS_SLACK = 4
STARTUP_S = 0.5  # at most this much CPU per process besides its burn: Python's start-up, subprocess's import


def _load_cpu_module():
    spec = importlib.util.spec_from_file_location("modelpress_bench_cpu", ROOT / "benchmarks" / "_cpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


cpu = _load_cpu_module()


# A parent that starts a child which starts a grandchild (each burns BURN_S of CPU, then waits for a line on
# stdin); the grandchild also starts a daemon in a session of its own that re-parents to init (like Ray's).
BURN = """
import os, subprocess, sys, time
def burn(s):
    t = time.process_time()
    while time.process_time() - t < s:
        pass
depth = int(sys.argv[1])
kids = []
if depth < 2:
    kids.append(subprocess.Popen([sys.executable, "-c", sys.argv[2], str(depth + 1), sys.argv[2]], stdin=subprocess.PIPE))
if depth == 2:  # a daemon: double fork, new session, not waited for
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            burn(float(os.environ["BURN_S"]))
            time.sleep(60)
        os._exit(0)
    os.wait()
burn(float(os.environ["BURN_S"]))
print("burnt", flush=True)
sys.stdin.readline()
for k in kids:
    k.stdin.write(b"go\\n"); k.stdin.flush(); k.wait()
"""


def test_cpu_of_a_tree_with_a_marked_daemon_and_nothing_else():
    mark = uuid.uuid4().hex
    env = {**os.environ, "BURN_S": str(BURN_S), "MODELPRESS_TEST_CPU_MARK": mark}
    bystander = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # busy, but not the server's
    parent = subprocess.Popen([sys.executable, "-c", BURN, "0", BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    tree = cpu.ProcessTree(parent.pid, ("MODELPRESS_TEST_CPU_MARK", mark))
    before = tree.sample()  # the processes have hardly started: most of their CPU falls between the samples
    stats = []
    try:
        assert parent.stdout.readline() == b"burnt\n"
        deadline = time.monotonic() + 60
        while len(stats) != 4 or any(s.ticks < BURN_S * cpu.CLK_TCK - TICKS_SLACK for s in stats):
            assert time.monotonic() < deadline, f"the tree never burnt: {stats}"
            time.sleep(0.05)
            stats = tree.stats()
        after = tree.sample()
    finally:
        bystander.kill()
        for s in stats:  # the daemon, which nobody waits for
            if s.pid != parent.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.pid, signal.SIGKILL)
        parent.kill()
        parent.communicate(timeout=30)  # reaps it and closes its pipes
        bystander.wait(30)
    assert bystander.pid not in {s.pid for s in stats}
    assert parent.pid in {s.pid for s in stats}  # with its child, its grandchild, and the daemon found by its mark
    whole = sum(after.values())
    assert cpu.ticks_between(before, after) == whole - sum(before.get(k, 0) for k in after)  # every tick between, none twice
    assert 4 * (BURN_S * cpu.CLK_TCK - TICKS_SLACK) <= whole <= 4 * (BURN_S + STARTUP_S) * cpu.CLK_TCK


def test_a_reused_pid_is_a_new_process_and_ended_ones_do_not_go_negative():
    before = {(10, 1): 50, (11, 1): 20}
    after = {(10, 2): 7, (11, 1): 25}  # pid 10 is another process now: all its 7 ticks count
    assert cpu.ticks_between(before, after) == 7 + 5
    assert cpu.ticks_between(after, {}) == 0
    assert cpu.seconds_between({}, {(1, 1): cpu.CLK_TCK}) == pytest.approx(1.0)


def test_read_stat_parses_a_command_name_with_spaces_and_parentheses(tmp_path):
    link = tmp_path / "odd ) name"
    link.symlink_to(sys.executable)
    proc = subprocess.Popen([str(link), "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE)
    try:
        s = cpu.read_stat(proc.pid)
        assert s is not None and s.pid == proc.pid and s.ppid == os.getpid() and s.start > 0 and s.ticks >= 0
    finally:
        proc.stdin.close()
        proc.wait(10)
    assert cpu.read_stat(proc.pid) is None


SPIN = """
import subprocess, sys
if sys.argv[1] == "0":
    subprocess.Popen([sys.executable, "-c", sys.argv[2], "1", sys.argv[2]])
while True:
    pass
"""


def _state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def _wait_states(tree, want: set[str], timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        states = [_state(s.pid) for s in tree.stats()]
        if (len(states) == 2 and set(states) <= want) or time.monotonic() > deadline:
            return states
        time.sleep(0.05)


def test_the_pauser_holds_every_tree_but_the_measured_one_stopped_and_continues_them_all_at_the_end():
    """Two servers, each a parent and a child spinning: ``only(a)`` stops b's whole tree and runs a's; ``only(None)``
    stops both (the in-process reference alone); leaving ``holding()`` continues every tree, so it can be ended."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN, "0", SPIN], start_new_session=True) for _ in range(2)]
    try:
        a, b = (cpu.ProcessTree(p.pid) for p in procs)
        _wait_states(a, {"R", "S"})  # both children started
        _wait_states(b, {"R", "S"})
        pauser = cpu.Pauser([a, b, a])  # targets of one server share its tree: listed once
        assert len(pauser.trees) == 2
        with pauser.holding():
            pauser.only(a)
            assert set(_wait_states(b, {"T"})) == {"T"}
            assert "T" not in _wait_states(a, {"R", "S"})
            pauser.only(None)
            assert set(_wait_states(a, {"T"})) == {"T"} and set(_wait_states(b, {"T"})) == {"T"}
            pauser.only(b)
            assert "T" not in _wait_states(b, {"R", "S"}) and set(_wait_states(a, {"T"})) == {"T"}
        assert "T" not in _wait_states(a, {"R", "S"}) and "T" not in _wait_states(b, {"R", "S"})
        off = cpu.Pauser([a, b], enabled=False)
        off.only(a)
        assert "T" not in _wait_states(b, {"R", "S"})
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
