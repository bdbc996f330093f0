"""modelpress._fs: files and folders are replaced whole or not at all; file_lock excludes other processes."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from modelpress._fs import atomic_file, atomic_folder, atomic_write_text, file_lock, replace_folder
from modelpress.progress import no_progress


def test_atomic_write_replaces_the_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        assert tmp.suffix == ".onnx" and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("the writer died")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_atomic_folder_replaces_an_existing_folder_only_when_complete(tmp_path):
    target = tmp_path / "art"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(ValueError), atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("2")
        raise ValueError("fill failed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # the temporary folder is gone
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # the old folder is gone too


def test_replace_folder_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    import os

    target, new = tmp_path / "t", tmp_path / "new"
    target.mkdir()
    (target / "old.txt").write_text("old")
    new.mkdir()
    real_rename = os.rename

    def rename(src, dst):
        if str(src) == str(new):
            raise OSError("disk full")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr("modelpress._fs._exchange", lambda a, b: False)  # a file system that cannot swap two folders
    with pytest.raises(OSError, match="disk full"):
        replace_folder(new, target)
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "t"]


def _hold(path, entered, seconds):
    with file_lock(path):
        entered.set()
        time.sleep(seconds)


def test_file_lock_makes_another_process_wait(tmp_path):
    lock = tmp_path / "locks" / "store.lock"
    ctx = multiprocessing.get_context("spawn")
    entered = ctx.Event()
    holder = ctx.Process(target=_hold, args=(lock, entered, 1.5))
    holder.start()
    try:
        assert entered.wait(60), "the other process never took the lock"
        t0 = time.monotonic()
        with file_lock(lock):
            waited = time.monotonic() - t0
        assert waited > 0.5, f"the lock was taken while another process held it (waited {waited:.2f} s)"
    finally:
        holder.join(60)
    assert holder.exitcode == 0


def test_no_progress_accepts_every_stage_silently():
    advance = no_progress("evaluating", 10)
    assert advance(3) is None
    assert no_progress("unknown total", None)(1) is None
