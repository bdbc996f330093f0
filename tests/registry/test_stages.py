"""Stages on each backend: one production version per model, promotion history, rollback."""

import pytest

from modelpress.errors import InvalidStageError, RegistryConflictError


@pytest.fixture
def three(registry, make_artifact):
    for c in "abc":
        registry.register(make_artifact(c), "m")
    return registry


def production(reg):
    return [v.version for v in reg.list_versions("m") if v.stage == "production"]


def test_promote_archives_the_previous_production_version(three):
    reg = three
    mv = reg.promote("m:1", "production", who="ana", why="baseline")
    assert mv.stage == "production" and mv.stage_history[-1] == {
        **mv.stage_history[-1],
        "from": "candidate",
        "to": "production",
        "who": "ana",
        "why": "baseline",
        "action": "promote",
    }
    reg.promote("m:2", "staging")
    reg.promote("m:2", "production", why="2x faster")
    assert production(reg) == [2]
    old = reg.get("m:1")
    assert old.stage == "archived" and old.stage_history[-1]["why"] == "2x faster" and old.stage_history[-1]["from"] == "production"
    assert reg.get("m@production").version == 2 and reg.get("m@archived").version == 1
    assert [e["to"] for e in reg.get("m:2").stage_history] == ["candidate", "staging", "production"]
    assert {m["name"]: m["production"] for m in reg.list_models()}["m"] == 2


def test_promoting_to_the_same_stage_changes_nothing(three):
    reg = three
    reg.promote("m:1", "production")
    before = reg.get("m:1").stage_history
    assert reg.promote("m:1", "production").stage_history == before


def test_register_straight_into_production(registry, make_artifact):
    registry.register(make_artifact("a"), "m", stage="production")
    mv = registry.register(make_artifact("b"), "m", stage="production", why="hotfix")
    assert mv.stage == "production" and production(registry) == [2] and registry.get("m:1").stage == "archived"


def test_rollback_walks_back_through_production_history(three):
    reg = three
    for v in (1, 2, 3):
        reg.promote(f"m:{v}", "production")
    mv = reg.rollback("m", who="oncall")
    assert mv.version == 2 and production(reg) == [2] and reg.get("m:3").stage == "archived"
    assert mv.stage_history[-1]["action"] == "rollback" and mv.stage_history[-1]["why"] == "rollback from m:3"
    assert reg.rollback("m").version == 1
    with pytest.raises(RegistryConflictError, match="nothing to roll back to"):
        reg.rollback("m")
    # A fresh promotion starts a new history on top of what is left.
    reg.promote("m:3", "production")
    assert reg.rollback("m").version == 1


def test_rollback_after_re_promoting_an_older_version(three):
    reg = three
    for v in (1, 2, 1):
        reg.promote(f"m:{v}", "production")
    assert reg.rollback("m").version == 2


def test_rollback_skips_deleted_versions(three):
    reg = three
    for v in (1, 2, 3):
        reg.promote(f"m:{v}", "production")
    reg.delete("m:2")
    assert reg.rollback("m").version == 1


def test_rollback_needs_a_production_version(three):
    with pytest.raises(RegistryConflictError, match="no version in production"):
        three.rollback("m")
    three.promote("m:1", "production")
    with pytest.raises(RegistryConflictError, match="only version"):
        three.rollback("m")


def test_stage_names_are_checked(three):
    with pytest.raises(InvalidStageError):
        three.promote("m:1", "prod")


def test_the_database_allows_one_production_version_whatever_the_code_does(three):
    """The partial unique index holds even against a direct UPDATE."""
    from sqlalchemy import update
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.orm import Session

    from modelpress.registry.db import VersionRow

    three.promote("m:1", "production")
    with Session(three.engine) as s, pytest.raises(IntegrityError):
        s.execute(update(VersionRow).where(VersionRow.version == 2).values(stage="production"))
        s.commit()
