"""`make bench`: run every benchmark script in this folder (``*_bench.py``), one after another, then
the tests marked ``bench`` (benchmark runs kept out of `make test`: ``pytest -m bench``).

Each script prints its own table with ratios measured side by side in one run; pass names to run
only some: ``python benchmarks/run.py runtimes`` (``tests``: only the bench-marked tests). After
each, no process it started may still run: they are found by a mark in their environment, listed,
ended, and the run fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from _procs import RUN_ENV, describe, end_processes, leftovers, load1


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


ROOT = Path(__file__).resolve().parent.parent
BENCH_TESTS = "tests marked bench"  # the name the run gives `pytest -m bench` in its output and its failures
BENCH_TESTS_COMMAND = [sys.executable, "-m", "pytest", "-m", "bench", "-q", str(ROOT / "tests")]


def run_script(command: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
    """Run one benchmark; on Ctrl-C or SIGTERM, let it end its own processes (passing the signal on) before returning."""
    proc = subprocess.Popen(command, env=env, cwd=cwd)
    try:
        return proc.wait()
    except Interrupted as exc:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        deadline = time.monotonic() + 2  # a terminal's Ctrl-C reached the script too: give it time to start its cleanup
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            proc.send_signal(exc.signum)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def main() -> int:
    here = Path(__file__).parent
    wanted = sys.argv[1:]
    scripts = sorted(p for p in here.glob("*_bench.py") if not wanted or any(w in p.stem for w in wanted))
    runs: list[tuple[str, list[str], Path | None]] = [(p.name, [sys.executable, str(p)], None) for p in scripts]
    if not wanted or "tests" in wanted:
        runs.append((BENCH_TESTS, BENCH_TESTS_COMMAND, ROOT))  # from the root: pyproject's pytest settings apply
    failed, strays = [], []
    for name, command, cwd in runs:
        # every process the script starts inherits this mark, whatever group or session it moves to
        mark = uuid.uuid4().hex
        print(f"\n=== {name} === (1-min load average {load1():.2f})", flush=True)
        try:
            if run_script(command, {**os.environ, RUN_ENV: mark}, cwd) != 0:
                failed.append(name)
        finally:  # after an interruption too
            left = leftovers(RUN_ENV, mark)
            if left:
                print(f"{name} left these processes running (now ended):\n{describe(left)}", file=sys.stderr, flush=True)
                end_processes(left)
        if left:
            strays.append(name)
    problems = [f"benchmarks failed: {', '.join(failed)}"] * bool(failed)
    problems += [f"benchmarks left processes running: {', '.join(strays)}"] * bool(strays)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _raise)
    signal.signal(signal.SIGTERM, _raise)
    try:
        sys.exit(main())
    except Interrupted as exc:
        print(f"\ninterrupted by signal {exc.signum}", file=sys.stderr)
        sys.exit(128 + exc.signum)
