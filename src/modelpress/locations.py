"""Where modelpress finds data and keeps its files.

The data folder is found from an explicit argument (``--data-dir``), then the
``MODELPRESS_DATA`` environment variable, then ``../shared/data`` beside the current project
if it exists. The home folder (registry, caches) is ``MODELPRESS_HOME`` or ``~/.modelpress``.
"""

from __future__ import annotations

import os
from pathlib import Path

from modelpress.errors import DataNotFoundError

DATA_ENV = "MODELPRESS_DATA"
HOME_ENV = "MODELPRESS_HOME"


def _candidates() -> list[Path]:
    here = Path.cwd().resolve()
    found = [here / "../shared/data", here / "shared/data"]
    # The checkout this package was installed from in development mode.
    pkg_root = Path(__file__).resolve().parents[2]
    found.append(pkg_root / "../shared/data")
    return found


def find_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The data folder, or None when there is none (a user's machine without shared data)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(
                f"The data folder '{path}' does not exist.",
                hint="Pass an existing folder, e.g. --data-dir ../shared/data, or set MODELPRESS_DATA.",
            )
        return path.resolve()
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(
                f"{DATA_ENV}={env} is not a folder.",
                hint=f"Point {DATA_ENV} at the folder that holds stsb/, sst2/, ... e.g. export {DATA_ENV}=../shared/data",
            )
        return path.resolve()
    for cand in _candidates():
        if cand.is_dir():
            return cand.resolve()
    return None


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data folder; raises :class:`DataNotFoundError` when there is none."""
    path = find_data_dir(explicit)
    if path is None:
        raise DataNotFoundError(
            "No data folder was found.",
            hint=f"Pass --data-dir DIR or set {DATA_ENV}=DIR (a folder with stsb/, sst2/, trec/, ...).",
        )
    return path


def home_dir() -> Path:
    path = Path(os.environ.get(HOME_ENV, "~/.modelpress")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(kind: str) -> Path:
    path = home_dir() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
