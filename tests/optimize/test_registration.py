"""Every technique is known from ``import modelpress``, in a fresh process, without loading a backend.

The configs package registers every technique name on import (pure pydantic); the handlers
registry imports no backend; importing the backends is one module's job (techniques.py).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

from modelpress.optimize.configs import TECHNIQUES

EVERY_TECHNIQUE = [
    {"technique": "dynamic-int8"},
    {"technique": "static-int8", "runtime": "openvino"},
    {"technique": "weight-only", "runtime": "openvino", "bits": 4},
    {"technique": "precision"},
    {"technique": "distill", "layers": 3},
    {"technique": "magnitude-prune", "sparsity": 0.5},
    {"technique": "magnitude-prune", "nm": "2:4"},
    {"technique": "sparsegpt", "sparsity": 0.5},
    {"technique": "wanda", "nm": "2:4"},
    {"technique": "structured-prune", "ratio": 0.25},
    {"technique": "gptq"},
    {"technique": "awq"},
    {"technique": "smoothquant"},
    {"technique": "qat", "runtime": "onnxruntime"},
]
HEAVY = ("torch", "onnxruntime", "openvino", "nncf", "transformers", "onnx", "torchao")


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_fresh_process_parses_a_recipe_naming_every_technique():
    code = f"""
import json, sys
import modelpress
from modelpress.optimize.recipe import Recipe
recipe = Recipe.model_validate({{"steps": {EVERY_TECHNIQUE!r}}})
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print(json.dumps({{"techniques": [s.technique for s in recipe.steps], "heavy": heavy}}))
"""
    got = _fresh(code)
    assert got["techniques"] == [s["technique"] for s in EVERY_TECHNIQUE]
    assert got["heavy"] == []  # parsing a recipe loads no backend library
    # the recipe above names every registered technique (a new one must be added to it)
    assert {s["technique"] for s in EVERY_TECHNIQUE} == set(TECHNIQUES) - {"test-weight-noise"}


def _imports(module) -> set[str]:
    """Every module ``module``'s source imports, at the top or inside functions."""
    tree = ast.parse(Path(module.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_handler_registry_imports_no_backend_and_techniques_loads_them_all():
    from modelpress.optimize import configs as configs_pkg
    from modelpress.optimize import handlers, techniques

    backends = (
        "modelpress.optimize.quantize",
        "modelpress.optimize.prune",
        "modelpress.optimize.distill",
        "modelpress.optimize.techniques",
    )
    assert not [m for m in _imports(handlers) if m.startswith(backends)]  # no circle: backends import the registry, not the reverse
    for sub in Path(configs_pkg.__file__).parent.glob("*.py"):  # the configs import nothing above themselves
        mods = _imports(type("M", (), {"__file__": str(sub)}))
        assert all(m.startswith(("modelpress.optimize.configs", "modelpress.errors")) for m in mods if m.startswith("modelpress")), sub
    assert "modelpress.optimize.quantize.onnxruntime" in _imports(techniques)
    pairs = {f"{c.__name__}@{rt}" for c, rt in handlers.HANDLERS}
    for pair in (
        "DynamicInt8@onnxruntime",
        "StaticInt8@openvino",
        "Distill@torch",
        "StructuredPrune@torch",
        "Wanda@torch",
        "MagnitudePrune@openvino",
    ):
        assert pair in pairs
    # every registered technique name has a handler on at least one runtime
    with_handler = {c.technique_name for c, _rt in handlers.HANDLERS}
    assert set(TECHNIQUES) <= with_handler
