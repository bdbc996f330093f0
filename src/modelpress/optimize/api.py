"""The Python verbs of optimization; ``modelpress optimize`` and ``modelpress tune`` call exactly these.

>>> import modelpress as mp
>>> mp.optimize("minilm", "recipe.yaml", "out/minilm-opt", data="stsb-dev")        # doctest: +SKIP
>>> mp.tune("minilm", max_drop=0.01, budget_s=300, output="out/minilm-tuned")        # doctest: +SKIP
>>> mp.apply_technique("minilm", {"technique": "dynamic-int8", "per_channel": True}, "out/int8")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from modelpress.optimize.handlers import apply_technique
from modelpress.optimize.recipe import Recipe, RecipeResult, run_recipe
from modelpress.optimize.search.tune import TuneResult
from modelpress.optimize.search.tune import tune as _tune


def optimize(model: Any, recipe: Recipe | dict[str, Any] | str | os.PathLike, output: str | os.PathLike, **options: Any) -> RecipeResult:
    """Run ``recipe`` on ``model``, writing every step's artifact under ``output``.

    Options: ``task``, ``data``, ``data_dir``, ``limit``, ``threads``, ``max_drop`` (default gate),
    ``register`` (record the original and shipped variants in the registry), ``registry``,
    ``name``, ``overwrite``, ``progress``. See :func:`modelpress.optimize.recipe.run_recipe`.
    """
    return run_recipe(model, recipe, output, **options)


def tune(model: Any, **options: Any) -> TuneResult:
    """The fastest variant that keeps quality; see :func:`modelpress.optimize.search.tune.tune`."""
    return _tune(model, **options)


__all__ = ["Recipe", "RecipeResult", "TuneResult", "apply_technique", "optimize", "tune"]
