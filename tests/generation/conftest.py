from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def stories260k(data_dir) -> Path:
    path = data_dir / "models/stories260k"
    if not (path / "config.json").is_file():
        pytest.skip(f"stories260k is absent from the shared data folder ({path})")
    return path
