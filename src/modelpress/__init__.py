"""modelpress: take a trained model to a fast, validated, versioned production service."""

# The subpackage modelpress.export is imported first so that the function below, not the
# package, is what `modelpress.export` names (importing a submodule later does not rebind it).
from modelpress import export as _export_package  # noqa: F401
from modelpress.api import bench, evaluate, export, info, load
from modelpress.artifacts import Artifact, Manifest, Signature, TensorSpec
from modelpress.bench.measure import BenchConfig
from modelpress.errors import ModelpressError
from modelpress.optimize.api import Recipe, apply_technique, optimize, run, tune
from modelpress.runtimes import create_runner
from modelpress.tasks import task_for

__version__ = "0.1.0"
__all__ = [
    "Artifact",
    "BenchConfig",
    "Manifest",
    "ModelpressError",
    "Recipe",
    "Signature",
    "TensorSpec",
    "apply_technique",
    "bench",
    "create_runner",
    "evaluate",
    "export",
    "info",
    "load",
    "optimize",
    "run",
    "task_for",
    "tune",
]
