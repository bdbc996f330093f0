"""modelpress: take a trained model to a fast, validated, versioned production service."""

import importlib
import os
import sys
import types
from typing import TYPE_CHECKING, Any

# The subpackage modelpress.export is imported first so that the function below, not the
# package, is what `modelpress.export` names (importing a submodule later does not rebind it).
from modelpress import export as _export_package  # noqa: F401
from modelpress.api import bench, evaluate, export, info, load
from modelpress.artifacts import Artifact, Manifest, Signature, TensorSpec
from modelpress.bench.measure import BenchConfig
from modelpress.errors import ModelpressError
from modelpress.runtimes import create_runner
from modelpress.tasks import task_for

if TYPE_CHECKING:
    from modelpress.optimize.api import Recipe, apply_technique, run, tune
    from modelpress.optimize.search.compare import compare

# The optimize verbs are imported on first use, so that importing a lower layer (modelpress.serving,
# modelpress.registry) does not import the optimize package, its techniques and their libraries.
_OPTIMIZE_NAMES = ("Recipe", "apply_technique", "run", "tune")


def __getattr__(name: str) -> Any:
    if name in _OPTIMIZE_NAMES:
        from modelpress.optimize import api

        return getattr(api, name)
    if name == "compare":  # model selection (modelpress compare), loaded on first use like the optimize verbs
        from modelpress.optimize.search.compare import compare

        return compare
    raise AttributeError(f"module 'modelpress' has no attribute {name!r}")


def optimize(model: Any, recipe: Any, output: str | os.PathLike, **options: Any) -> Any:
    """Run ``recipe`` on ``model``; see :func:`modelpress.optimize.api.optimize`."""
    from modelpress.optimize.api import optimize as _optimize

    return _optimize(model, recipe, output, **options)


class _Package(types.ModuleType):
    """``modelpress.optimize`` names the verb above, also once the subpackage is imported.

    When a subpackage is first imported, Python binds it as an attribute of its parent; the
    subpackage of the same name would then hide the verb (``mp.optimize(...)`` would call a module).
    This property keeps the verb; the subpackage stays reachable through ``import modelpress.optimize.x``
    (``sys.modules``), which is how every module imports it.
    """

    @property
    def optimize(self) -> Any:
        return optimize

    @optimize.setter
    def optimize(self, _subpackage: Any) -> None:
        pass

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # pickled by name, as every module is (cloudpickle, used by Ray, pickles plain modules so)
        return importlib.import_module, (self.__name__,)


sys.modules[__name__].__class__ = _Package

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
    "compare",
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
