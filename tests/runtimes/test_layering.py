"""The bottom layers import nothing above them, checked in fresh interpreters.

``modelpress/__init__`` imports the public verbs (and so nearly everything); to see what a
subpackage itself pulls in, the parent package is put in ``sys.modules`` without running its
``__init__``, then only the subpackage is imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PROBE = """
import importlib.util, json, sys, types
spec = importlib.util.find_spec("modelpress")
parent = types.ModuleType("modelpress")
parent.__path__ = list(spec.submodule_search_locations)
sys.modules["modelpress"] = parent
import {module}
print(json.dumps(sorted(m for m in sys.modules if m.startswith("modelpress."))))
"""

ABOVE = {
    "modelpress.tasks": [
        "runtimes",
        "export",
        "bench",
        "sources",
        "zoo",
        "api",
        "optimize",
        "registry",
        "serving",
        "rollout",
        "ship",
        "cli",
    ],
    "modelpress.runtimes": ["export", "bench", "sources", "zoo", "api", "optimize", "registry", "serving", "rollout", "ship", "cli"],
    "modelpress.export": ["bench", "sources", "zoo", "api", "optimize", "registry", "serving", "rollout", "ship", "cli"],
}


def _imported_by(module: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROBE.format(module=module))], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", sorted(ABOVE))
def test_a_bottom_package_imports_nothing_above_it(module):
    loaded = _imported_by(module)
    assert module in loaded
    above = [m for m in loaded if m.split(".")[1] in ABOVE[module]]
    assert above == [], f"importing {module} imported {above}"


def test_import_modelpress_registers_the_exporters_as_converters():
    code = "import modelpress; from modelpress.runtimes import CONVERTERS; print(sorted(CONVERTERS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['aoti', 'executorch', 'onnx', 'openvino', 'torchscript']"
