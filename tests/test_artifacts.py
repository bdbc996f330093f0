import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

from modelpress.artifacts import MANIFEST_NAME, Artifact, Manifest, Signature, TensorSpec, hash_folder
from modelpress.errors import ArtifactError


def _manifest(**kw):
    sig = Signature(
        inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 2])],
    )
    return Manifest(name="m", task="image-classification", format="onnx", model_file="model.onnx", signature=sig, **kw)


def test_write_is_atomic_and_hashed(tmp_path):
    def fill(tmp):
        (tmp / "model.onnx").write_bytes(b"abc")
        (tmp / "sub").mkdir()
        (tmp / "sub/extra.txt").write_text("x")
        return {"metrics": {"acc": 0.5}}

    art = Artifact.write(tmp_path / "a", _manifest(), fill)
    assert set(art.manifest.files) == {"model.onnx", "sub/extra.txt"} and art.manifest.metrics == {"acc": 0.5}
    assert art.manifest.content_hash == hash_folder(tmp_path / "a")[1]
    assert "torch" in art.manifest.tool_versions and art.manifest.created_at
    again = Artifact.open(tmp_path / "a")
    assert again.manifest == art.manifest and again.verify() == []


def test_failure_inside_fill_leaves_nothing(tmp_path):
    def fill(tmp):
        (tmp / "model.onnx").write_bytes(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Artifact.write(tmp_path / "a", _manifest(), fill)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_keeps_old_until_new_is_complete(tmp_path):
    Artifact.write(tmp_path / "a", _manifest(), lambda t: (t / "model.onnx").write_bytes(b"v1") and None)

    def failing(tmp):
        raise ValueError("bad")

    with pytest.raises(ValueError):
        Artifact.write(tmp_path / "a", _manifest(), failing, overwrite=True)
    assert (tmp_path / "a/model.onnx").read_bytes() == b"v1"
    Artifact.write(tmp_path / "a", _manifest(), lambda t: (t / "model.onnx").write_bytes(b"v2") and None, overwrite=True)
    assert (tmp_path / "a/model.onnx").read_bytes() == b"v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_sigkill_mid_write_leaves_no_target(tmp_path):
    """A process killed while writing leaves only a hidden temp folder, never a half artifact."""
    script = textwrap.dedent(
        f"""
        import time, sys
        from modelpress.artifacts import Artifact, Manifest
        def fill(tmp):
            (tmp / "model.onnx").write_bytes(b"x" * 1000)
            print("filling", flush=True)
            time.sleep(30)
        Artifact.write({str(tmp_path / "a")!r}, Manifest(name="m", task="embedding", format="onnx"), fill)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "filling"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert not (tmp_path / "a").exists()
    with pytest.raises(ArtifactError, match=r"no modelpress\.json"):
        Artifact.open(tmp_path / "a")


def test_manifest_round_trips_json_and_yaml():
    m = _manifest(task_config={"labels": ["a", "b"]}, step={"technique": "x"})
    assert Manifest.model_validate_json(m.model_dump_json()) == m
    assert Manifest.model_validate(yaml.safe_load(yaml.safe_dump(m.model_dump(mode="json")))) == m


def test_unknown_manifest_keys_are_rejected(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"name": "m", "task": "embedding", "format": "onnx", "colour": "red"}))
    with pytest.raises(ArtifactError, match="colour"):
        Artifact.open(tmp_path)


def test_existing_target_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        Artifact.write(tmp_path / "a", _manifest(), lambda t: None)
