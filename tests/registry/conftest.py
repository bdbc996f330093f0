"""Registry fixtures: tiny artifacts, and a registry on each backend (SQLite file and PostgreSQL).

Every test that takes ``registry`` (or ``backend``) runs twice: on a SQLite file under a fresh
MODELPRESS_HOME, and on PostgreSQL in a schema of its own that is dropped afterwards. The server
is ``$MODELPRESS_TEST_DATABASE_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``);
where none answers, the PostgreSQL runs are skipped with the reason.

The backend is chosen through the environment (``MODELPRESS_HOME``, ``MODELPRESS_REGISTRY_URL``),
so ``Registry()``, the CLI and subprocesses all open the same registry.
"""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelpress.artifacts import Artifact, Manifest, Signature, TensorSpec

PG_ENV = "MODELPRESS_TEST_DATABASE_URL"
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_CONNECT_TIMEOUT_S = 3  # a local server answers in milliseconds; this only bounds a dead address
SUBPROCESS_TIMEOUT_S = 120  # a child imports modelpress (about 1 s) and writes a few small files


@functools.cache
def _pg_server() -> tuple[str | None, str]:
    """(URL, "") when a PostgreSQL server answers, else (None, why not)."""
    url = os.environ.get(PG_ENV) or PG_DEFAULT
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "psycopg is not installed (pip install 'modelpress[postgres]')"
    import sqlalchemy as sa

    engine = sa.create_engine(url, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except (sa.exc.SQLAlchemyError, OSError) as exc:  # any failure to connect means: no server to test against
        first = (str(getattr(exc, "orig", exc)).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"no PostgreSQL server answers at {sa.make_url(url).render_as_string(hide_password=True)} ({first}); set {PG_ENV}"
    finally:
        engine.dispose()
    return url, ""


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a new schema, dropped (with everything in it) afterwards."""
    base, why = _pg_server()
    if base is None:
        pytest.skip(why)
    import sqlalchemy as sa

    schema = f"mp_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh MODELPRESS_HOME, with no registry URL or store set from outside."""
    path = tmp_path / "home"
    monkeypatch.setenv("MODELPRESS_HOME", str(path))
    for var in ("MODELPRESS_REGISTRY_URL", "MODELPRESS_REGISTRY_STORE", "MODELPRESS_TEST_CRASH_AT", "MODELPRESS_TEST_CRASH_PAUSE"):
        monkeypatch.delenv(var, raising=False)
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """'sqlite' (the default file, <home>/registry.db) or 'postgres' (MODELPRESS_REGISTRY_URL set)."""
    if request.param == "postgres":
        monkeypatch.setenv("MODELPRESS_REGISTRY_URL", request.getfixturevalue("pg_url"))
    return request.param


@pytest.fixture
def registry(backend: str) -> Iterator[Any]:
    from modelpress.registry.api import Registry

    reg = Registry()
    try:
        yield reg
    finally:
        reg.close()


SIGNATURE = Signature(
    inputs=[TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])],
    outputs=[TensorSpec(name="last_hidden_state", dtype="float32", shape=["batch", "sequence", 8])],
)


@pytest.fixture
def make_artifact(tmp_path: Path) -> Callable[..., Artifact]:
    """``make_artifact(content="a", **manifest fields)``: a small ONNX-shaped artifact folder.

    The same ``content`` gives the same files (so the same content hash); the manifest fields
    (parent, step, task_config, metrics, ...) do not change the hash.
    """
    counter = itertools.count()

    def make(content: str = "a", *, name: str = "m", extra_files: dict[str, bytes] | None = None, **fields: Any) -> Artifact:
        def fill(folder: Path) -> None:
            (folder / "model.onnx").write_bytes(f"onnx-graph:{content}".encode() * 64)
            (folder / "tokenizer.json").write_text('{"model": "tiny"}')
            (folder / "weights").mkdir()
            (folder / "weights/part-0.bin").write_bytes(bytes(range(256)) * 4 + content.encode())
            for rel, data in (extra_files or {}).items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(data)

        manifest = Manifest(name=name, task="embedding", format="onnx", model_file="model.onnx", signature=SIGNATURE, **fields)
        return Artifact.write(tmp_path / "artifacts" / f"{content}-{next(counter)}", manifest, fill)

    return make


CHILD_REGISTER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from modelpress.artifacts import Artifact
    from modelpress.registry.api import Registry

    folder, name, go = sys.argv[1], sys.argv[2], sys.argv[3]
    if go != "-":  # imported: say "ready", then wait for the start signal; every child races from here
        Path(f"{go}.ready.{os.getpid()}").touch()
        while not Path(go).exists():
            time.sleep(0.005)
    with Registry() as reg:  # opening may create or upgrade the schema: part of the race
        mv = reg.register(Artifact.open(folder), name)
    print(mv.version)
    """
)


def spawn_register(folder: Path, name: str, *, go: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A child process that opens the registry named by the environment and registers ``folder``."""
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_REGISTER, str(folder), name, str(go) if go else "-"],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """``spawn_register``; at teardown every child is ended and its pipes closed."""
    children: list[subprocess.Popen] = []

    def start(*args: Any, **kwargs: Any) -> subprocess.Popen:
        children.append(child := spawn_register(*args, **kwargs))
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=60)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
