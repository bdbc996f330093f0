"""Safety of the store on each backend: crashes at every point of a registration (in a child that
really dies), check and repair, damaged files, and paths that try to leave the store."""

import os
import shutil
import signal
import time

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from modelpress.artifacts import MANIFEST_NAME
from modelpress.errors import RegistryError
from modelpress.registry.api import Registry
from modelpress.registry.store import CRASH_ENV, CRASH_PAUSE_ENV, CRASH_POINTS, ArtifactStore, safe_relpath

SUBPROCESS_TIMEOUT_S = 120  # a child imports modelpress (about 1 s) and registers a few small files


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_at_any_point_leaves_the_old_state_or_the_new(registry, make_artifact, spawn, point):
    """The child is SIGKILLed at ``point``; the registry then holds v1 alone or v1 and v2, never a
    version without its files, and ``check --repair`` clears whatever the crash left behind."""
    v1 = registry.register(make_artifact("old"), "m")
    new = make_artifact("new")
    child = spawn(new.path, "m", env={CRASH_ENV: point})
    _, err = child.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL, err

    with Registry() as reg:
        versions = [v.version for v in reg.list_versions("m")]
        committed = point == "after_commit"
        assert versions == ([1, 2] if committed else [1])
        for v in reg.list_versions("m"):
            assert not reg.store.verify(v.content_hash, v.artifact().manifest.files)
        for sha in reg.store.list_artifacts():  # every folder in artifacts/ is complete
            assert not reg.store.verify(sha, new.manifest.files if sha == new.content_hash() else v1.artifact().manifest.files)
        report = reg.check()
        assert not report.corrupt and not report.missing
        leftovers = {"during_copy": "temps", "after_copy": "temps", "after_rename": "orphans", "before_commit": "orphans"}.get(point)
        if leftovers:
            assert not report.ok and len(getattr(report, leftovers)) == 1
            repaired = reg.check(repair=True)
            assert repaired.ok and repaired.removed == getattr(report, leftovers)
        else:
            assert report.ok
        assert reg.check().ok and reg.store.list_temps(include_live=True) == []
        # The registry carries on: the same artifact registers cleanly now.
        assert reg.register(new, "m").version == (3 if committed else 2)
        assert reg.check().ok


def test_check_finds_corrupt_and_missing_files(registry, make_artifact):
    v1 = registry.register(make_artifact("a"), "m")
    v2 = registry.register(make_artifact("b"), "m")
    registry.register(make_artifact("b"), "other")
    (v1.path / "weights/part-0.bin").write_bytes(b"bit rot")
    os.remove(v2.path / "model.onnx")
    report = registry.check()
    assert not report.ok and not report.orphans
    assert {(c["content_hash"], tuple(c["files"])) for c in report.corrupt} == {
        (v1.content_hash, ("weights/part-0.bin",)),
        (v2.content_hash, ("model.onnx",)),
    }
    assert report.damaged_versions == ["m:1", "m:2", "other:1"]
    assert registry.check(repair=True).damaged_versions == report.damaged_versions  # damage is reported, never "repaired" away
    assert registry.get("m:1").version == 1
    shutil.rmtree(v1.path)
    assert registry.check().missing == [{"content_hash": v1.content_hash, "versions": ["m:1"]}]
    with pytest.raises(RegistryError, match="missing"):
        registry.export("m:1", registry.home / "out")
    # Registering the same files again heals the folder.
    registry.register(make_artifact("a"), "m")
    registry.register(make_artifact("b"), "m")
    assert registry.check().ok


def test_check_reports_strays_and_repair_removes_only_them(registry, make_artifact):
    v1 = registry.register(make_artifact("a"), "m")
    (registry.store.artifacts / "not-a-hash.txt").write_text("x")
    (registry.store.artifacts / ("0" * 64)).mkdir()
    dead_tmp = registry.store.root / "tmp-otherhost-1-abc"
    dead_tmp.mkdir()
    os.utime(dead_tmp, (0, 0))  # another machine's copy, stale for days
    report = registry.check(repair=True)
    assert len(report.orphans) == 2 and report.temps == [str(dead_tmp)] and report.ok
    assert registry.store.list_artifacts() == [v1.content_hash] and files_under(registry.store.artifacts)[0] == v1.content_hash


def test_a_live_copy_is_not_a_leftover(registry, make_artifact, spawn, tmp_path):
    """A registration paused mid-copy in another process is neither reported nor removed."""
    marker = tmp_path / "paused"
    child = spawn(make_artifact("slow").path, "m", env={CRASH_ENV: "during_copy", CRASH_PAUSE_ENV: str(marker)})
    try:
        for _ in range(SUBPROCESS_TIMEOUT_S * 20):
            if marker.exists() or child.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.read_text() == "during_copy"
        report = registry.check(repair=True)
        assert report.ok and report.temps == [] and len(registry.store.list_temps(include_live=True)) == 1
    finally:
        child.kill()
        child.wait(timeout=SUBPROCESS_TIMEOUT_S)
    assert len(registry.check(repair=True).removed) == 1


def test_tampered_file_paths_in_the_database_are_never_followed(registry, make_artifact, tmp_path):
    """A row whose file list points outside the store is reported by check and refused by export."""
    v1 = registry.register(make_artifact("a"), "m")
    outside = tmp_path / "escape.txt"
    with Session(registry.engine) as s:
        s.execute(
            text("UPDATE artifacts SET files = :f WHERE sha256 = :sha"),
            {"f": '{"../../../escape.txt": "00", "/etc/hostname": "00"}', "sha": v1.content_hash},
        )
        s.commit()
    report = registry.check()
    assert sorted(report.corrupt[0]["files"]) == ["../../../escape.txt", "/etc/hostname"]
    with pytest.raises(RegistryError, match="could point outside"):
        registry.export("m:1", tmp_path / "out")
    assert not outside.exists() and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/abs", "a//b", "./a", "a\\b", "", "a/."])
def test_safe_relpath_refuses_escapes(rel):
    with pytest.raises(RegistryError):
        safe_relpath(rel)


def test_safe_relpath_accepts_nested_files():
    assert str(safe_relpath("1_Pooling/config.json")) == "1_Pooling/config.json"


def test_hostile_names_write_nothing_anywhere(home, make_artifact, tmp_path):
    from modelpress.errors import InvalidNameError, InvalidReferenceError

    art = make_artifact("a")
    with Registry() as reg:
        before = files_under(tmp_path)
        for name in ("../../escape", "/tmp/escape", "..", "a/b", "a\\..\\b"):
            with pytest.raises(InvalidNameError):
                reg.register(art, name)
        for ref in ("../../escape:1", "m/../../x@production", "..:latest"):
            with pytest.raises(InvalidReferenceError):
                reg.get(ref)
        assert files_under(tmp_path) == before


def test_the_store_stays_bound_to_its_registry(home, make_artifact, tmp_path):
    store = tmp_path / "shared-store"
    with Registry(tmp_path / "a.db", store=store) as reg:
        reg.register(make_artifact("a"), "m")
    with pytest.raises(RegistryError, match="belongs to another registry"):
        Registry(tmp_path / "b.db", store=store)
    (store / "registry-id").unlink()
    with pytest.raises(RegistryError, match="no registry-id file"):
        Registry(tmp_path / "c.db", store=store)


def test_stored_folder_has_the_first_manifest_and_every_file(registry, make_artifact):
    art = make_artifact("a", extra_files={"1_Pooling/config.json": b"{}"})
    mv = registry.register(art, "m")
    assert files_under(mv.path) == sorted(
        ["1_Pooling", "1_Pooling/config.json", MANIFEST_NAME, "model.onnx", "tokenizer.json", "weights", "weights/part-0.bin"]
    )
    assert ArtifactStore(registry.store.root).verify(mv.content_hash, art.manifest.files) == []
