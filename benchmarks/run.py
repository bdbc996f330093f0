"""`make bench`: run every benchmark script in this folder (``*_bench.py``), one after another.

Each script prints its own table with ratios measured side by side in one run; pass names to run
only some: ``python benchmarks/run.py runtimes``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

here = Path(__file__).parent
wanted = sys.argv[1:]
scripts = sorted(p for p in here.glob("*_bench.py") if not wanted or any(w in p.stem for w in wanted))
failed = []
for script in scripts:
    print(f"\n=== {script.name} ===", flush=True)
    if subprocess.call([sys.executable, str(script)]) != 0:
        failed.append(script.name)
if failed:
    sys.exit(f"benchmarks failed: {', '.join(failed)}")
