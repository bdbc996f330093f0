"""What a plain import pulls in, in a fresh interpreter (``modelpress/__init__`` runs, as for a user)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import {module}
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("modelpress.", "typer")))))
"""


def _imported_by(module: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_serving_imports_neither_optimize_nor_rollouts_nor_typer():
    loaded = _imported_by("modelpress.serving")
    assert "modelpress.serving" in loaded
    assert [m for m in loaded if m.startswith(("modelpress.optimize", "modelpress.rollout", "modelpress.cli", "typer"))] == []


def test_the_package_pickles_by_name():
    import pickle

    import modelpress

    assert pickle.loads(pickle.dumps(modelpress)) is modelpress  # what Ray's cloudpickle needs when a closure uses `mp`


def test_the_optimize_verb_keeps_its_name_once_the_subpackage_is_imported():
    code = (
        "import modelpress as mp, modelpress.optimize.recipe, inspect;"
        "print(inspect.isfunction(mp.optimize), mp.Recipe.__module__, mp.tune.__module__, mp.run.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["True", "modelpress.optimize.recipe", "modelpress.optimize.api", "modelpress.optimize.api"]
