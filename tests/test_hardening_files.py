"""Hardening of files and artifacts (issue 12): pickled weights, remote code, symbolic links,
manifest paths, the export cache's key, whole-folder swaps and a full disk."""

from __future__ import annotations

import ast
import errno
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests._processes import run_group

import modelpress as mp
from modelpress._fs import _host, clean_stale, replace_folder
from modelpress.artifacts import MANIFEST_NAME, Artifact, Manifest
from modelpress.errors import ArtifactError, RegistryError

SRC = Path(__file__).resolve().parent.parent / "src" / "modelpress"


def _manifest(**kw) -> Manifest:
    return Manifest(**{"name": "m", "task": "embedding", "format": "onnx", "model_file": "model.onnx", **kw})


def _write(folder: Path, content: bytes = b"graph", **kw) -> Artifact:
    return Artifact.write(folder, _manifest(**kw), lambda t: (t / "model.onnx").write_bytes(content) and None, overwrite=True)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- pickled weights and remote code ----------------------------------------------------------


class _Payload:
    """A pickle that, when unpickled, creates a file: what a hostile pytorch_model.bin does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def pickled_encoder(tiny_encoder, tmp_path_factory) -> Path:
    """The tiny encoder with its weights as pytorch_model.bin (no safetensors)."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickled") / "enc"
    shutil.copytree(tiny_encoder, folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_are_refused_by_default_and_read_only_by_explicit_opt_in(pickled_encoder, tiny_encoder, monkeypatch):
    monkeypatch.delenv("MODELPRESS_ALLOW_PICKLE", raising=False)
    art = mp.load(str(pickled_encoder))
    with pytest.raises(ArtifactError, match=r"only pickled weights \(pytorch_model\.bin\).*\n.*MODELPRESS_ALLOW_PICKLE=1"):
        mp.create_runner(art, "torch").load()
    batch = {"input_ids": np.array([[101, 2023, 102]]), "attention_mask": np.ones((1, 3), dtype=np.int64)}
    allowed, safe = mp.create_runner(art, "torch", allow_pickle=True), mp.create_runner(mp.load(str(tiny_encoder)), "torch")
    try:
        got, want = allowed.load().run(batch), safe.load().run(batch)
    finally:
        allowed.close()
        safe.close()
    np.testing.assert_array_equal(next(iter(got.values())), next(iter(want.values())))  # the same weights, read from the pickle


def test_prune_and_distill_refuse_pickled_weights(pickled_encoder, monkeypatch):
    from modelpress.optimize.distill.distill import load_hf_model
    from modelpress.optimize.prune.magnitude import load_trainable
    from modelpress.tasks import task_for

    monkeypatch.delenv("MODELPRESS_ALLOW_PICKLE", raising=False)
    art = mp.load(str(pickled_encoder))
    with pytest.raises(ArtifactError, match="only pickled weights"):
        load_trainable(art)
    with pytest.raises(ArtifactError, match="only pickled weights"):
        load_hf_model(art, task_for(art))


def test_a_hostile_pickle_runs_no_code_even_when_pickles_are_allowed(pickled_encoder, tmp_path, monkeypatch):
    folder = tmp_path / "hostile"
    shutil.copytree(pickled_encoder, folder)
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    art = mp.load(str(folder))
    monkeypatch.delenv("MODELPRESS_ALLOW_PICKLE", raising=False)
    with pytest.raises(ArtifactError):
        mp.create_runner(art, "torch").load()
    monkeypatch.setenv("MODELPRESS_ALLOW_PICKLE", "1")  # opted in: torch.load(weights_only=True) still refuses the code
    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported|global"):
        mp.create_runner(art, "torch").load()
    assert not marker.exists()


def test_the_torch_floor_is_not_affected_by_cve_2025_32434():
    import tomllib

    deps = tomllib.loads((SRC.parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.replace(" ", "").startswith("torch>="))
    floor = tuple(int(x) for x in torch_dep.split(">=")[1].split(",")[0].split(".")[:2])
    assert floor >= (2, 6), torch_dep


# Loaders that cannot run a repository's code: concrete model classes and generation configs.
_NO_REMOTE_CODE = {"GenerationConfig"}


def test_every_transformers_loader_sets_trust_remote_code_false():
    """Every ``Auto*.from_pretrained`` call (and every call through a task's auto class) passes
    ``trust_remote_code=False`` (or the kwargs of :func:`hf_load_kwargs`, which always hold it)."""
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained"):
                continue
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else ast.unparse(owner)
            auto = name.startswith("Auto") or "auto_model_class" in name or name == "auto"
            if not auto or name in _NO_REMOTE_CODE:
                continue
            explicit = any(
                k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False for k in node.keywords
            )
            via_kwargs = any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id == "kwargs" for k in node.keywords)
            direct = any(  # **hf_load_kwargs(folder) spread into the call itself
                k.arg is None and isinstance(k.value, ast.Call) and ast.unparse(k.value.func).endswith("hf_load_kwargs")
                for k in node.keywords
            )
            if not (explicit or direct or (via_kwargs and "hf_load_kwargs" in path.read_text())):
                missing.append(f"{rel}:{node.lineno}")
    assert missing == []


def test_hf_load_kwargs_never_trust_remote_code(tiny_encoder, pickled_encoder):
    from modelpress.runtimes.torch import hf_load_kwargs

    assert hf_load_kwargs(tiny_encoder) == {"trust_remote_code": False, "use_safetensors": True}
    assert hf_load_kwargs(pickled_encoder, allow_pickle=True) == {"trust_remote_code": False, "use_safetensors": False}


# -- symbolic links and manifest paths ---------------------------------------------------------


def test_registering_refuses_a_link_to_a_file_outside_the_folder(tmp_path, monkeypatch):
    from modelpress.registry.api import Registry

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MODELPRESS_REGISTRY_URL", raising=False)
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY----- secret")
    art = _write(tmp_path / "art")
    (art.path / "notes.txt").symlink_to(secret)
    (art.path / "inner.txt").symlink_to(art.path / "model.onnx")  # a link inside the folder is fine on its own
    with Registry() as reg:
        with pytest.raises(ArtifactError, match=r"symbolic links to paths outside the folder.*notes\.txt"):
            reg.register(Artifact(art.manifest.model_copy(update={"content_hash": None}), art.path), "m")
        assert reg.list_models() == []
        stored = [p for p in reg.store.root.rglob("*") if p.is_file()]
        assert not any("PRIVATE KEY" in p.read_text(errors="ignore") for p in stored)
        (art.path / "notes.txt").unlink()
        (art.path / "linked-dir").symlink_to(tmp_path, target_is_directory=True)  # a folder outside: refused too
        with pytest.raises(ArtifactError, match="linked-dir"):
            reg.register(Artifact(art.manifest.model_copy(update={"content_hash": None}), art.path), "m")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"model_file": "../secret.onnx"}, "model_file"),
        ({"model_file": "/etc/passwd"}, "model_file"),
        ({"files": {"../../etc/passwd": "0" * 64}}, "files"),
        ({"task_config": {"tokenizer": "/etc"}}, "tokenizer"),
        ({"task_config": {"tokenizer": "../other-model"}}, "tokenizer"),
        ({"task_config": {"runtime_options": {"torch": {"calibration": "../../x.npz"}}}}, "calibration"),
    ],
)
def test_a_manifest_path_that_leaves_the_folder_is_refused_on_open(tmp_path, fields, match):
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"g")
    (folder / MANIFEST_NAME).write_text(_manifest(**fields).model_dump_json())
    with pytest.raises(ArtifactError, match=match):
        Artifact.open(folder)
    with pytest.raises(ArtifactError, match=match):
        mp.load(str(folder))


def test_a_model_file_that_is_a_link_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(b"not yours")
    art = _write(tmp_path / "art")
    (art.path / "model.onnx").unlink()
    (art.path / "model.onnx").symlink_to(outside)
    with pytest.raises(ArtifactError, match="symbolic link"):
        Artifact.open(art.path)


def test_verify_reports_a_path_that_leaves_the_folder_without_reading_it(tmp_path):
    from modelpress.artifacts import sha256_file

    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"someone else's file")
    art = _write(tmp_path / "art")
    art.manifest.files["../outside.bin"] = sha256_file(outside)  # the right hash: only the path gives it away
    assert art.verify() == ["../outside.bin"]


def test_paths_inside_the_folder_are_accepted(tmp_path):
    art = _write(tmp_path / "art", task_config={"tokenizer": "."})
    assert Artifact.open(art.path).model_file == art.path / "model.onnx"
    (art.path / "tok").mkdir()
    assert Artifact.open(art.path).manifest.task_config["tokenizer"] == "."
    sub = _write(tmp_path / "sub", task_config={"tokenizer": "tok"})
    assert Artifact.open(sub.path).manifest.task_config["tokenizer"] == "tok"
    abs_self = _write(tmp_path / "art2", task_config={"tokenizer": str(tmp_path / "art2")})
    assert Artifact.open(abs_self.path).manifest.task_config["tokenizer"] == str(tmp_path / "art2")


# -- the export cache --------------------------------------------------------------------------


def test_a_lying_manifest_does_not_get_another_models_cached_export(tmp_path, monkeypatch):
    from modelpress.export import cache

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    victim = _write(tmp_path / "victim", b"victim weights", format="hf", model_file=None)
    built: list[str] = []

    def build(content: bytes):
        def make(target: Path) -> Artifact:
            built.append(content.decode())
            return _write(target, content)

        return make

    mine = cache.cached(victim, "onnx", build(b"victim export"))
    assert built == ["victim export"]
    # Another folder whose manifest claims the victim's content hash, with other files.
    liar_dir = tmp_path / "liar"
    liar_dir.mkdir()
    (liar_dir / "model.onnx").write_bytes(b"attacker weights")
    (liar_dir / MANIFEST_NAME).write_text(victim.manifest.model_copy(update={"model_file": "model.onnx"}).model_dump_json())
    liar = Artifact.open(liar_dir)
    assert liar.content_hash() == victim.content_hash()  # the claim
    got = cache.cached(liar, "onnx", build(b"liar export"))
    assert built[-1] == "liar export" and got.path != mine.path
    assert (mine.path / "model.onnx").read_bytes() == b"victim export"  # untouched
    assert cache.cached(victim, "onnx", build(b"again")).path == mine.path and built[-1] == "liar export"  # a hit


def test_a_cached_export_whose_files_changed_is_rebuilt(tmp_path, monkeypatch):
    from modelpress.export import cache

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    src = _write(tmp_path / "src", b"weights", format="hf", model_file=None)
    first = cache.cached(src, "onnx", lambda t: _write(t, b"export"))
    (first.path / "model.onnx").write_bytes(b"tampered")
    again = cache.cached(src, "onnx", lambda t: _write(t, b"export"))
    assert (again.path / "model.onnx").read_bytes() == b"export"


# -- whole-folder swaps ------------------------------------------------------------------------


def test_overwriting_an_artifact_leaves_the_old_or_the_new_folder_at_every_instant(tmp_path, monkeypatch):
    """After every rename the overwrite does, the target is there: the swap never leaves a moment without it."""
    target = tmp_path / "a"
    _write(target, b"v0")
    real, states = os.rename, []

    def rename(src, dst):
        real(src, dst)
        states.append((Path(src).name, Path(dst).name, target.is_dir() and (target / "model.onnx").is_file()))

    monkeypatch.setattr(os, "rename", rename)
    _write(target, b"v1")
    assert states and all(present for *_, present in states), states
    assert (target / "model.onnx").read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no .tmp- or .old- folder left


def test_without_an_atomic_swap_the_old_folder_is_put_back_by_the_next_writer(tmp_path, monkeypatch):
    """A writer that died between moving the old folder aside and renaming the new one in leaves
    ``.a.old-PID@HOST-x``; the next write of ``a`` puts it back first, then replaces it."""
    target = tmp_path / "a"
    _write(target, b"old")
    aside = tmp_path / f".a.old-{_dead_pid()}@{_host()}-dead"
    os.rename(target, aside)
    stale_tmp = tmp_path / f".a.tmp-{_dead_pid()}@{_host()}-dead"
    stale_tmp.mkdir()
    (stale_tmp / "half.onnx").write_bytes(b"half")
    live_tmp = tmp_path / f".a.tmp-{os.getpid()}@{_host()}-live"  # a live writer's folder is left alone
    live_tmp.mkdir()
    clean_stale(target)
    assert (target / "model.onnx").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a", live_tmp.name])
    monkeypatch.setattr("modelpress._fs._exchange", lambda a, b: False)  # the fallback (a file system that cannot swap)
    _write(target, b"new")
    assert (target / "model.onnx").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a", live_tmp.name])


def test_sigkill_during_an_overwrite_keeps_the_old_folder_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "a"
    _write(target, b"old")
    script = (
        "import os, signal\n"
        "from modelpress.artifacts import Artifact, Manifest\n"
        "def fill(t):\n"
        "    (t / 'model.onnx').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "m = Manifest(name='m', task='embedding', format='onnx', model_file='model.onnx')\n"
        f"Artifact.write({str(target)!r}, m, fill, overwrite=True)\n"
    )
    done = run_group([sys.executable, "-c", script], timeout=120, capture_output=True)
    assert done.returncode == -9, done.stderr
    assert (target / "model.onnx").read_bytes() == b"old" and Artifact.open(target).verify() == []
    assert len(list(tmp_path.glob(".a.tmp-*"))) == 1  # the dead writer's temporary folder
    _write(target, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_replace_folder_swaps_in_one_step(tmp_path, monkeypatch):
    old, new = tmp_path / "t", tmp_path / "n"
    old.mkdir()
    (old / "x").write_text("old")
    new.mkdir()
    (new / "x").write_text("new")
    calls = []
    real = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: calls.append((a, b)) or real(a, b))
    replace_folder(new, old)
    assert (old / "x").read_text() == "new" and not new.exists()
    assert all(Path(b).name != "t" for _, b in calls)  # the target was never renamed away: the kernel swapped it


# -- a full disk -------------------------------------------------------------------------------


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_an_artifact_is_a_clear_error_and_keeps_the_old_folder(tmp_path):
    _write(tmp_path / "a", b"old")
    with pytest.raises(ArtifactError, match=r"No space left.*\n.*[Ff]ree some space"):
        Artifact.write(tmp_path / "a", _manifest(), _enospc, overwrite=True)
    assert (tmp_path / "a/model.onnx").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only); skipped where mounting is not allowed."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root; the injected-ENOSPC test covers the error")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _registry_state(reg) -> tuple:
    versions = [(v.name, v.version, v.content_hash) for m in reg.list_models() for v in reg.list_versions(m["name"])]
    return versions, reg.store.list_artifacts()


def test_a_registry_on_a_full_disk_fails_clearly_and_keeps_its_state(tmp_path, small_disk, monkeypatch):
    """A real 1 MiB file system: the first small artifact fits, a 2 MiB one does not."""
    from modelpress.registry.api import Registry

    monkeypatch.delenv("MODELPRESS_REGISTRY_URL", raising=False)
    monkeypatch.delenv("MODELPRESS_REGISTRY_STORE", raising=False)
    small = _write(tmp_path / "small-art", b"s" * 1000)
    big = _write(tmp_path / "big-art", os.urandom(2 << 20))
    with Registry(home=small_disk) as reg:
        reg.register(small, "m")
        before = _registry_state(reg)
        with pytest.raises(RegistryError, match=r"No space left.*previous state.*\n.*[Ff]ree some space"):
            reg.register(big, "m")
        assert _registry_state(reg) == before
        assert reg.check().ok and reg.store.list_temps(include_live=True) == []
        assert reg.get("m:1").artifact().verify() == []


@pytest.mark.parametrize("where", ["copy", "database"])
def test_an_injected_enospc_in_the_registry_fails_clearly_and_keeps_its_state(tmp_path, monkeypatch, where):
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from modelpress.registry import store as store_mod
    from modelpress.registry.api import Registry

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MODELPRESS_REGISTRY_URL", raising=False)
    monkeypatch.delenv("MODELPRESS_REGISTRY_STORE", raising=False)
    with Registry() as reg:
        reg.register(_write(tmp_path / "one", b"one"), "m")
        before = _registry_state(reg)
        if where == "copy":
            monkeypatch.setattr(store_mod.shutil, "copyfile", _enospc)
            match = r"No space left on the device of the registry's store"
        else:
            from modelpress.registry import registering

            def full(*_a, **_k):  # what SQLAlchemy raises when SQLite cannot grow its file
                raise OperationalError("INSERT INTO versions", {}, sqlite3.OperationalError("database or disk is full"))

            monkeypatch.setattr(registering.Registering, "_insert_version", full)
            match = "out of disk space.*rolled back"
        with pytest.raises(RegistryError, match=match):
            reg.register(_write(tmp_path / "two", b"two"), "m")
        monkeypatch.undo()
        monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
        assert _registry_state(reg) == before
        assert reg.check().ok
