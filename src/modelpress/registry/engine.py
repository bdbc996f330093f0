"""Connecting to the registry database and bringing its schema up to date.

- No URL: one SQLite file, ``<home>/registry.db`` (home is ``MODELPRESS_HOME`` or
  ``~/.modelpress``), in WAL mode with foreign keys on and a busy timeout, so that concurrent
  writers wait for each other instead of failing. Write transactions start with
  ``BEGIN IMMEDIATE`` so two writers never both hold a read snapshot they cannot upgrade.
- Any SQLAlchemy URL for a shared registry; PostgreSQL (``postgresql+psycopg://...``) is the one
  supported and tested. ``postgresql://`` is read as psycopg 3 when psycopg2 is absent.
- A plain path (no ``://``) is a SQLite file.

Opening runs the Alembic revisions in ``migrations/`` up to head, with a Config built in code
(no alembic.ini), so it works from an installed package.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelpress.errors import BackendUnavailableError, ConfigError, RegistryError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Connection, Engine

URL_ENV = "MODELPRESS_REGISTRY_URL"
STORE_ENV = "MODELPRESS_REGISTRY_STORE"
DB_FILE = "registry.db"
BUSY_TIMEOUT_S = 60
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 72_431_001  # pg_advisory_xact_lock key: one schema upgrade at a time
WRITE = {"modelpress_write": True}  # execution option: start the transaction for writing


def make_url(url: str | os.PathLike | None, home: Path) -> URL:
    """The database URL: an explicit one, else ``$MODELPRESS_REGISTRY_URL``, else ``<home>/registry.db``."""
    from sqlalchemy.engine import make_url as sa_make_url
    from sqlalchemy.exc import ArgumentError

    text = str(url) if url is not None else os.environ.get(URL_ENV) or ""
    if not text:
        return sa_make_url(f"sqlite:///{home / DB_FILE}")
    if "://" not in text:
        return sa_make_url(f"sqlite:///{Path(text).expanduser().resolve()}")
    try:
        parsed = sa_make_url(text)
    except ArgumentError as exc:
        raise ConfigError(
            f"'{text}' is not a database URL ({exc}).",
            hint="Use e.g. postgresql+psycopg://user@host:5432/dbname or sqlite:////abs/path/registry.db.",
        ) from None
    if parsed.drivername in ("postgresql", "postgres") and importlib.util.find_spec("psycopg2") is None:
        parsed = parsed.set(drivername="postgresql+psycopg")  # SQLAlchemy's default driver is psycopg2: use psycopg 3
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(
            "An in-memory SQLite registry cannot keep its artifacts consistent across connections.",
            hint="Use a file, e.g. sqlite:////tmp/registry.db, or leave the URL out for ~/.modelpress/registry.db.",
        )
    return parsed


def display_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def create_engine(url: URL) -> Engine:
    """An engine with the registry's connection settings for SQLite or a server database."""
    import sqlalchemy as sa
    from sqlalchemy import event

    kwargs: dict[str, Any] = {}
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.database:  # a file, not an in-memory database
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": BUSY_TIMEOUT_S}
    elif backend == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        engine = sa.create_engine(url, **kwargs)
    except (ImportError, sa.exc.NoSuchModuleError) as exc:
        raise BackendUnavailableError(
            f"The database driver for '{url.drivername}' is not installed ({exc}).",
            hint="For PostgreSQL: pip install 'modelpress[postgres]' and use postgresql+psycopg://user@host/db.",
        ) from None

    if backend == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = FULL")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            write = conn.get_execution_options().get("modelpress_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def alembic_config(connection: Connection | None = None) -> Any:
    """An Alembic Config for the registry's revisions, built in code (no alembic.ini)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head_revision() -> str:
    """The newest revision in ``migrations/`` (read once per process: the files do not change)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package ships its migrations
        raise RegistryError("The registry's migrations folder has no revision.", hint="Reinstall modelpress.")
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the revisions up to ``revision`` in one transaction (concurrent openers wait, then no-op)."""
    from alembic import command
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import DBAPIError

    try:
        if revision == "head" and current_revision(engine) == head_revision():
            return
        with engine.execution_options(**WRITE).begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
            command.upgrade(alembic_config(conn), revision)
    except CommandError as exc:
        raise RegistryError(
            f"Cannot bring the registry database {display_url(engine.url)} to revision {revision}: {exc}",
            hint="The database may have been written by a newer modelpress; upgrade modelpress (pip install -U modelpress).",
        ) from None
    except DBAPIError as exc:
        raise RegistryError(
            f"Cannot open the registry database {display_url(engine.url)}: {str(exc.orig).strip().splitlines()[0]}",
            hint="Check that the server is running and the URL (user, host, port, database) is right.",
        ) from None
