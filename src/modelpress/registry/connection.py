"""One connection to a registry: its database engine, its artifact store and its transactions.

:class:`RegistryBase` opens (and migrates) the database, binds the store to it and runs
transactions: :meth:`~RegistryBase._read` in one session, :meth:`~RegistryBase._write` in a
write session that runs again when a concurrent writer won a unique-constraint race. The verbs
are added by :class:`~modelpress.registry.registering.Registering`,
:class:`~modelpress.registry.maintenance.Maintenance` and :class:`~modelpress.registry.api.Registry`.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from modelpress.errors import RegistryError
from modelpress.registry import queries
from modelpress.registry.db import MetaRow, VersionRow
from modelpress.registry.engine import STORE_ENV, WRITE, create_engine, display_url, make_url, upgrade
from modelpress.registry.names import Ref, parse_ref
from modelpress.registry.records import ModelVersion
from modelpress.registry.store import ArtifactStore, Prepared

RefLike = str | Ref | ModelVersion
T = TypeVar("T")
_FULL_RE = re.compile(r"disk is full|no space left|could not extend file|disk full", re.IGNORECASE)  # SQLite, PostgreSQL
_RETRIES = 8  # attempts of a write that lost a unique-constraint race to another writer

__all__ = ["RefLike", "RegistryBase", "as_ref"]


def as_ref(ref: RefLike) -> Ref:
    """``ref`` (``"NAME:VERSION"``, ``"NAME@stage"``, a :class:`Ref` or a :class:`ModelVersion`) as a :class:`Ref`."""
    if isinstance(ref, ModelVersion):
        return Ref(ref.name, version=ref.version)
    return parse_ref(ref)


class RegistryBase:
    """The database and store of a registry, and the transactions over them (see :class:`~modelpress.registry.api.Registry`)."""

    def __init__(
        self, url: str | os.PathLike | None = None, home: str | os.PathLike | None = None, store: str | os.PathLike | None = None
    ) -> None:
        from modelpress.locations import home_dir

        if home is not None:
            self.home = Path(home).expanduser().resolve()
            self.home.mkdir(parents=True, exist_ok=True)
        else:
            self.home = home_dir()
        self.url = make_url(url, self.home)
        self.engine = create_engine(self.url)
        self._writer = self.engine.execution_options(**WRITE)
        try:
            upgrade(self.engine)
            with self._session() as s:
                row = s.get(MetaRow, "registry_id")
                self.registry_id = row.value if row else "unknown"
            self.store = ArtifactStore(self._store_root(store))
            self.store.bind(self.registry_id)
        except BaseException:
            self.engine.dispose()
            raise

    def _store_root(self, store: str | os.PathLike | None) -> Path:
        if store is not None:
            return Path(store)
        if os.environ.get(STORE_ENV):
            return Path(os.environ[STORE_ENV])
        if self.url.get_backend_name() == "sqlite" and self.url.database:
            db = Path(self.url.database).expanduser().resolve()
            return db.parent / ("store" if db.name == "registry.db" else f"{db.stem}-store")
        # A server (or in-memory) database; never <home>/store, which belongs to the default SQLite registry.
        return self.home / "stores" / re.sub(r"[^A-Za-z0-9]", "", self.registry_id)[:64]

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry(url={display_url(self.url)!r}, store={str(self.store.root)!r})"

    # -- sessions --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _session(self, write: bool = False) -> Iterator[Any]:
        """One transaction: committed when the block ends, rolled back on an error."""
        try:
            with Session(self._writer if write else self.engine, expire_on_commit=False) as s, s.begin():
                yield s
        except IntegrityError:
            raise  # a lost race: _with_retry runs the transaction again
        except DBAPIError as exc:
            first = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
            if _FULL_RE.search(first):
                raise RegistryError(
                    f"The registry database {display_url(self.url)} is out of disk space: {first}; the transaction was rolled "
                    "back, so the registry keeps its previous state.",
                    hint="Free some space on the database's disk (df -h), then run the command again.",
                ) from None
            raise RegistryError(
                f"The registry database {display_url(self.url)} failed: {first}",
                hint="Check that the database is reachable and not locked by a stuck process; then try again.",
            ) from None

    def _with_retry(self, fn: Callable[[], T]) -> T:
        """Run a write transaction again when a concurrent writer won a unique-constraint race."""
        for attempt in range(_RETRIES):
            try:
                return fn()
            except IntegrityError as exc:
                if attempt == _RETRIES - 1:
                    raise RegistryError(f"The registry kept conflicting with concurrent writers: {str(exc.orig).splitlines()[0]}") from None
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self, fn: Callable[[Any], T]) -> T:
        with self._session() as s:
            return fn(s)

    def _write(self, fn: Callable[[Any], T]) -> T:
        def run() -> T:
            with self._session(write=True) as s:
                return fn(s)

        return self._with_retry(run)

    def _describe(self, s: Any, row: VersionRow) -> ModelVersion:
        return queries.describe(s, self.store, row)

    def _same(self, s: Any, name: str, prepared: Prepared, *, describe: bool = False) -> Any:
        want = queries.settings_of(prepared.manifest.model_dump(mode="json"))
        for row in reversed(queries.versions_with_hash(s, name, prepared.sha256)):
            if queries.settings_of(row.manifest or row.artifact.manifest or {}) == want:
                return self._describe(s, row) if describe else row
        return None
