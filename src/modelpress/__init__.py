"""modelpress: take a trained model to a fast, validated, versioned production service."""

# The subpackage modelpress.export is imported first so that the function below, not the
# package, is what `modelpress.export` names (importing a submodule later does not rebind it).
from . import export as _export_package  # noqa: F401
from .api import bench, evaluate, export, info, load
from .artifacts import Artifact, Manifest, Signature, TensorSpec
from .bench.measure import BenchConfig
from .errors import ModelpressError
from .optimize.api import Recipe, apply_technique, optimize, tune
from .runtimes import create_runner
from .tasks import task_for

__version__ = "0.1.0"
__all__ = [
    "Artifact",
    "BenchConfig",
    "Manifest",
    "ModelpressError",
    "Recipe",
    "apply_technique",
    "Signature",
    "TensorSpec",
    "bench",
    "create_runner",
    "evaluate",
    "export",
    "info",
    "load",
    "optimize",
    "task_for",
    "tune",
]
