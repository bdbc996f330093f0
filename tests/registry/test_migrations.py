"""Schema and migrations on each backend: old registries open in a newer modelpress; the models match head."""

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import text

from modelpress.errors import BackendUnavailableError, ConfigError, RegistryError
from modelpress.registry.api import Registry
from modelpress.registry.db import Base
from modelpress.registry.engine import create_engine, current_revision, head_revision, make_url, upgrade


@pytest.fixture
def url(backend, home):
    """The backend's database URL, with nothing created in it yet."""
    return os.environ.get("MODELPRESS_REGISTRY_URL") or str(home / "registry.db")


def test_a_registry_at_revision_0001_opens_and_upgrades(url, home, make_artifact):
    """A database written by the first schema (no per-version manifests, no deployments) keeps its
    versions, gets them filled in, and takes new ones."""
    engine = create_engine(make_url(url, home))
    upgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    old = make_artifact("old")
    manifest = old.manifest.model_dump(mode="json")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO models (id, name, next_version, created_at) VALUES (1, 'legacy', 2, CURRENT_TIMESTAMP)"))
        conn.execute(
            text(
                "INSERT INTO artifacts (sha256, task, format, model_file, files, manifest, size_bytes, created_at)"
                " VALUES (:sha, 'embedding', 'onnx', 'model.onnx', :files, :manifest, 10, CURRENT_TIMESTAMP)"
            ),
            {"sha": old.content_hash(), "files": json.dumps(old.manifest.files), "manifest": json.dumps(manifest)},
        )
        conn.execute(
            text(
                "INSERT INTO versions (id, model_id, version, artifact_sha, stage, created_at) "
                "VALUES (1, 1, 1, :sha, 'production', CURRENT_TIMESTAMP)"
            ),
            {"sha": old.content_hash()},
        )
    with engine.connect() as conn:
        registry_id = conn.execute(text("SELECT value FROM registry_meta WHERE key = 'registry_id'")).scalar()
    engine.dispose()

    with Registry(url) as reg:
        assert current_revision(reg.engine) == head_revision() == "0004"
        assert reg.registry_id == registry_id
        v1 = reg.get("legacy@production")
        assert v1.version == 1 and v1.manifest["content_hash"] == old.content_hash() and v1.artifact().manifest.task == "embedding"
        # Its files were never in this store: check says so, and registering them again heals it.
        assert reg.check().damaged_versions == ["legacy:1"]
        v2 = reg.register(old, "legacy")
        assert v2.version == 2 and reg.check().ok
    with Registry(url) as reg:  # opening an up-to-date registry changes nothing
        assert [v.version for v in reg.list_versions("legacy")] == [1, 2]


def test_the_models_match_the_head_revision(registry):
    """db.py and the migrations describe the same schema (a new column needs a new revision)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with registry.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_a_database_from_a_newer_modelpress_is_refused(url, home):
    with Registry(url) as reg, reg.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(RegistryError, match="revision head") as info:
        Registry(url)
    assert "newer modelpress" in info.value.hint


def test_sqlite_runs_in_wal_mode_with_foreign_keys(home):
    with Registry() as reg:
        assert reg.url.database == str(home / "registry.db") and reg.store.root == home / "store"
        with reg.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_urls(home, tmp_path, monkeypatch):
    assert make_url(None, home).database == str(home / "registry.db")
    assert make_url("rel/registry.db", home).database == str((Path.cwd() / "rel/registry.db").resolve())
    monkeypatch.setenv("MODELPRESS_REGISTRY_URL", f"sqlite:///{tmp_path / 'env.db'}")
    assert make_url(None, home).database == str(tmp_path / "env.db")
    assert make_url("postgresql://u@h/db", home).drivername == "postgresql+psycopg"
    for memory in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(ConfigError, match="in-memory"):
            make_url(memory, home)
    with pytest.raises(ConfigError, match="not a database URL"):
        make_url("::not a url://", home)
    with pytest.raises(BackendUnavailableError, match="driver"):
        create_engine(make_url("nosuchdb://u@h/x", home))


def test_an_unreachable_server_is_a_clear_error(home):
    with pytest.raises(RegistryError, match="Cannot open the registry database") as info:
        Registry("postgresql+psycopg://nobody:secret@127.0.0.1:9/none")
    assert "secret" not in str(info.value) and "server is running" in info.value.hint
