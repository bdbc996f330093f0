"""`make bench`: run every benchmark script in this folder (``*_bench.py``), one after another.

Each script prints its own table with ratios measured side by side in one run; pass names to run
only some: ``python benchmarks/run.py runtimes``. After each script, no process it started may
still run: they are found by a mark in their environment, listed, ended, and the run fails.
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


def run_script(script: Path, env: dict[str, str]) -> int:
    """Run one benchmark; on Ctrl-C or SIGTERM, let it end its own processes (passing the signal on) before returning."""
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
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
    failed, strays = [], []
    for script in scripts:
        # every process the script starts inherits this mark, whatever group or session it moves to
        mark = uuid.uuid4().hex
        print(f"\n=== {script.name} === (1-min load average {load1():.2f})", flush=True)
        try:
            if run_script(script, {**os.environ, RUN_ENV: mark}) != 0:
                failed.append(script.name)
        finally:  # after an interruption too
            left = leftovers(RUN_ENV, mark)
            if left:
                print(f"{script.name} left these processes running (now ended):\n{describe(left)}", file=sys.stderr, flush=True)
                end_processes(left)
        if left:
            strays.append(script.name)
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
