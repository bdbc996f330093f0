"""The Registry API on each backend: registering, reading, content addressing, reuse, annotations, delete, export."""

import json

import pytest

from modelpress.artifacts import MANIFEST_NAME, Artifact, hash_folder
from modelpress.errors import (
    ArtifactError,
    ConfigError,
    InvalidNameError,
    InvalidReferenceError,
    RegistryConflictError,
    RegistryNotFoundError,
)
from modelpress.registry.api import Registry
from modelpress.registry.store import ArtifactStore


def test_register_and_get(registry, make_artifact):
    art = make_artifact("a", metrics={"spearman": 0.86, "note": "text is skipped"})
    v1 = registry.register(art, "minilm", metrics={"latency_ms": {"value": 3.5, "runtime": "onnxruntime", "machine": "x86"}})
    assert (v1.name, v1.version, v1.stage, v1.content_hash) == ("minilm", 1, "candidate", art.content_hash())
    assert v1.task == "embedding" and v1.format == "onnx" and v1.model_file == "model.onnx"
    assert v1.size_bytes == sum(p.stat().st_size for p in art.path.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    assert v1.metric("spearman") == 0.86 and v1.metric("latency_ms") == 3.5 and v1.metric("note") is None
    speed = next(m for m in v1.metrics if m["name"] == "latency_ms")
    assert (speed["kind"], speed["runtime"], speed["machine"]) == ("speed", "onnxruntime", "x86")
    assert v1.stage_history[0]["action"] == "register" and v1.stage_history[0]["to"] == "candidate"
    for ref in ("minilm", "minilm:1", "minilm:latest", "minilm:v1", v1):
        assert registry.get(ref).content_hash == art.content_hash()
    stored = v1.artifact()
    assert stored.path == v1.path and stored.path.parent == registry.store.artifacts
    assert not stored.verify() and hash_folder(stored.path)[1] == art.content_hash()
    assert json.loads(json.dumps(v1.to_json()))["ref"] == "minilm:1"


def test_versions_are_numbered_per_model_and_never_reused(registry, make_artifact):
    assert [registry.register(make_artifact(c), "m").version for c in "abc"] == [1, 2, 3]
    assert registry.register(make_artifact("a"), "other").version == 1
    registry.delete("m:3")
    assert registry.register(make_artifact("d"), "m").version == 4
    assert [v.version for v in registry.list_versions("m")] == [1, 2, 4]
    models = {m["name"]: m for m in registry.list_models()}
    assert models["m"]["versions"] == 3 and models["m"]["latest"] == 4 and models["other"]["latest"] == 1
    assert models["m"]["production"] is None and models["m"]["updated_at"]


def test_shared_files_are_stored_once(registry, make_artifact):
    a1, a2 = make_artifact("same"), make_artifact("same", step={"technique": "noop"})
    v1, v2, v3 = registry.register(a1, "m"), registry.register(a2, "m"), registry.register(a1, "elsewhere")
    assert v1.content_hash == v2.content_hash == v3.content_hash
    assert registry.store.list_artifacts() == [v1.content_hash] and v1.path == v2.path == v3.path
    assert registry.check().ok


def test_each_version_keeps_its_own_manifest(registry, make_artifact):
    """A variant that only changes runtime options shares its parent's files, not its settings."""
    base = make_artifact("same")
    variant = make_artifact(
        "same",
        parent=base.content_hash(),
        step={"technique": "precision", "runtime": "openvino"},
        task_config={"runtime_options": {"openvino": {"precision": "bf16"}}},
    )
    v1 = registry.register(base, "m")
    v2 = registry.register(variant, "m", parent="m:1")
    assert v1.content_hash == v2.content_hash
    assert v1.artifact().manifest.task_config == {}
    assert v2.artifact().manifest.task_config == {"runtime_options": {"openvino": {"precision": "bf16"}}}
    assert registry.get("m:2").manifest["step"]["technique"] == "precision"


def test_manifest_parent_hash_links_lineage(registry, make_artifact):
    base = registry.register(make_artifact("a"), "m")
    child = make_artifact("b", parent=base.content_hash, step={"technique": "quantize", "bits": 8})
    v2 = registry.register(child, "m")
    assert v2.parents == ["m:1"] and v2.step == "quantize" and v2.config == {"technique": "quantize", "bits": 8}
    orphan = registry.register(make_artifact("c", parent="f" * 64), "m")
    assert orphan.parents == [] and orphan.step is None


def test_the_latest_is_never_its_own_parent(registry, make_artifact):
    """``parent='m:latest'`` means the latest version before this one (a bug once made it a self-loop)."""
    registry.register(make_artifact("a"), "m")
    v2 = registry.register(make_artifact("b"), "m", parent="m:latest", step="distill")
    assert v2.parents == ["m:1"] and v2.step == "distill"
    assert registry.lineage("m:2")["root"]["ref"] == "m:1"


def test_step_from_a_technique_config(registry, make_artifact):
    from pydantic import BaseModel

    class Cfg(BaseModel):
        bits: int = 8

    registry.register(make_artifact("a"), "m")
    v2 = registry.register(make_artifact("b"), "m", parent="m:1", step=Cfg())
    assert v2.step == "Cfg" and v2.config == {"technique": "Cfg", "bits": 8}
    with pytest.raises(ConfigError, match="A step must be"):
        registry.register(make_artifact("c"), "m", parent="m:1", step=3.5)


def test_the_leads_flow_original_then_variants(registry, make_artifact):
    """What optimize/tune do: register the original (again and again), then each variant under it."""
    original = make_artifact("orig", metrics={"spearman": 0.867})
    v0 = registry.register(original, "minilm", reuse=True)
    assert not v0.reused and v0.version == 1
    variant = make_artifact(
        "int8", parent=original.content_hash(), step={"technique": "quantize", "runtime": "onnxruntime", "per_channel": True}
    )
    v1 = registry.register(variant, "minilm", parent=f"minilm:{v0.version}", metrics={"spearman": 0.861, "latency_ms": 4.1})
    assert v1.parents == ["minilm:1"] and v1.config["per_channel"] is True

    for _ in range(2):  # a rerun of optimize: same files, same note, a new measurement
        again = registry.register(original, "minilm", reuse=True, metrics={"latency_ms": 9.9}, tags=["baseline"], note="original")
    assert again.reused and again.version == 1 and again.metric("latency_ms") == 9.9 and again.tags == ["baseline"]
    assert [n["text"] for n in again.notes] == ["original"] and [m["name"] for m in again.metrics].count("latency_ms") == 2
    assert [v.version for v in registry.list_versions("minilm")] == [1, 2]
    # The same variant made again is the same version too.
    assert registry.register(variant, "minilm", parent="minilm:1", reuse=True).version == 2


def test_reuse_copies_nothing(registry, make_artifact, monkeypatch):
    art = make_artifact("a")
    registry.register(art, "m")

    def no_copy(*_a, **_k):
        raise AssertionError("reuse must not copy the files again")

    monkeypatch.setattr(ArtifactStore, "copy_in", no_copy)
    monkeypatch.setattr(ArtifactStore, "place", no_copy)
    assert registry.register(art, "m", reuse=True, stage="staging").stage == "staging"


def test_registering_stored_files_again_does_not_copy_them(registry, make_artifact, monkeypatch):
    registry.register(make_artifact("a"), "m")
    copies = []
    real = ArtifactStore.copy_in
    monkeypatch.setattr(ArtifactStore, "copy_in", lambda self, p: copies.append(p) or real(self, p))
    assert registry.register(make_artifact("a"), "m").version == 2 and copies == []
    registry.register(make_artifact("new"), "m")
    assert len(copies) == 1


def test_reuse_tells_settings_apart(registry, make_artifact):
    registry.register(make_artifact("a"), "m")
    other = make_artifact("a", task_config={"pooling": "cls"})
    assert registry.find("m", other) is None
    v2 = registry.register(other, "m", reuse=True)
    assert not v2.reused and v2.version == 2
    assert registry.find("m", other).version == 2
    assert [v.version for v in registry.find_by_hash("m", other.content_hash())] == [1, 2]
    assert registry.find_by_hash("nobody", other.content_hash()) == []
    with pytest.raises(ConfigError, match="not a content hash"):
        registry.find_by_hash("m", "abc")


def test_register_refuses_bad_input_before_writing_anything(registry, make_artifact, tmp_path):
    art = make_artifact("a")
    with pytest.raises(InvalidNameError):
        registry.register(art, "../evil")
    with pytest.raises(RegistryNotFoundError, match="no model named 'ghost'"):
        registry.register(art, "m", parent="ghost:1")
    with pytest.raises(ConfigError, match="finite number"):
        registry.register(art, "m", metrics={"spearman": float("nan")})
    with pytest.raises(InvalidReferenceError):
        registry.register(art, "m", parent="m:zero")
    (art.path / "model.onnx").write_bytes(b"changed after the manifest was written")
    with pytest.raises(ArtifactError, match="changed after its manifest was written"):
        registry.register(Artifact.open(art.path), "m")
    with pytest.raises(ArtifactError, match="lives only in memory"):
        registry.register(Artifact(art.manifest), "m")
    with pytest.raises(ArtifactError, match=r"no modelpress\.json"):
        registry.register(tmp_path, "m")
    assert registry.list_models() == [] and registry.store.list_artifacts() == [] and registry.store.list_temps(include_live=True) == []


def test_model_file_must_be_inside_the_artifact(registry, make_artifact):
    art = make_artifact("a")
    for bad in ("../../outside.onnx", "/etc/passwd", "missing.onnx"):
        art.manifest.model_file = bad
        with pytest.raises(ArtifactError, match="model_file"):
            registry.register(art, "m")
    art.manifest.model_file = "weights"  # a folder inside the artifact is fine
    assert registry.register(art, "m").model_file == "weights"


def test_a_loaded_folder_without_manifest_registers(registry, tmp_path):
    """A model folder as modelpress.load returns it (no modelpress.json, tokenizer in the folder)."""
    from modelpress.artifacts import Manifest

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    art = Artifact(Manifest(name="hf", task="embedding", format="hf", task_config={"pooling": "mean", "tokenizer": str(folder)}), folder)
    mv = registry.register(art, "hf")
    assert mv.artifact().manifest.task_config == {"pooling": "mean"}  # the stored copy finds its own tokenizer
    assert registry.register(art, "hf", reuse=True).reused


def test_tags_notes_and_metrics(registry, make_artifact):
    registry.register(make_artifact("a"), "m", tags=["fp32", "fp32", "baseline"], note="first cut")
    mv = registry.tag("m:1", "best-sts")
    assert registry.tag("m:1", "best-sts").tags == mv.tags == ["fp32", "baseline", "best-sts"]
    assert registry.untag("m:1", "fp32").tags == ["baseline", "best-sts"]
    mv = registry.note("m:1", "calibrated on 512 pairs", who="ana")
    assert [n["text"] for n in mv.notes] == ["first cut", "calibrated on 512 pairs"] and mv.notes[1]["who"] == "ana"
    mv = registry.record_metrics("m", {"spearman": 0.85}, dataset="stsb-dev", runtime="torch")
    mv = registry.record_metrics("m", {"spearman": 0.86}, dataset="stsb-dev", runtime="openvino")
    assert mv.metric("spearman") == 0.86 and {m["runtime"] for m in mv.metrics} == {"torch", "openvino"}
    with pytest.raises(ConfigError):
        registry.record_metrics("m", {})
    with pytest.raises(ConfigError):
        registry.note("m", "  ")
    with pytest.raises(ConfigError):
        registry.record_metrics("m", {"x": 1}, kind="vibes")


def test_not_found_errors_say_what_exists(registry, make_artifact):
    with pytest.raises(RegistryNotFoundError, match="registry is empty"):
        registry.get("nothing")
    registry.register(make_artifact("a"), "m")
    with pytest.raises(RegistryNotFoundError) as info:
        registry.get("m:7")
    assert info.value.hint == "Versions: 1."
    with pytest.raises(RegistryNotFoundError, match="Known models: m"):
        registry.get("other")
    with pytest.raises(RegistryNotFoundError, match="No version of 'm' is in production"):
        registry.get("m@production")


def test_delete_guards_and_file_sharing(registry, make_artifact):
    registry.register(make_artifact("a"), "m")
    registry.register(make_artifact("b"), "m", parent="m:1")
    registry.register(make_artifact("b"), "m")  # shares v2's files
    registry.promote("m:3", "production")
    with pytest.raises(RegistryConflictError, match="has descendants \\(m:2\\)"):
        registry.delete("m:1")
    with pytest.raises(RegistryConflictError, match="in production"):
        registry.delete("m:3")
    with pytest.raises(InvalidReferenceError, match="delete needs one"):
        registry.delete("m@production")
    shared = registry.get("m:2").path
    assert registry.delete("m:2")["files_removed"] is False and shared.is_dir()
    result = registry.delete("m:3", force=True)
    assert result["files_removed"] is True and result["forced_past"] == ["it is in production"] and not shared.exists()
    assert registry.delete("m:1")["files_removed"] is True
    assert registry.store.list_artifacts() == [] and registry.check().ok
    with pytest.raises(RegistryNotFoundError, match="no versions left"):
        registry.get("m")


def test_export(registry, make_artifact, tmp_path):
    base = make_artifact("a")
    registry.register(base, "m")
    registry.register(make_artifact("a", task_config={"runtime_options": {"onnxruntime": {"threads": 1}}}), "m")
    out = registry.export("m:2", tmp_path / "out" / "m2")
    assert out.manifest.task_config == {"runtime_options": {"onnxruntime": {"threads": 1}}}
    assert not out.verify() and out.manifest.content_hash == base.content_hash()
    with pytest.raises(ArtifactError, match="already exists"):
        registry.export("m:1", out.path)
    assert registry.export("m:1", out.path, overwrite=True).manifest.task_config == {}
    (tmp_path / "empty").mkdir()
    assert registry.export("m", tmp_path / "empty").path == tmp_path / "empty"
    for inside in (registry.store.root, registry.store.artifacts / "x", registry.store.root.parent):
        with pytest.raises(ArtifactError, match="overlaps the registry's store"):
            registry.export("m:1", inside, overwrite=True)
    assert registry.check().ok


def test_registry_on_a_custom_sqlite_path_and_store(home, make_artifact, tmp_path):
    with Registry(tmp_path / "team.db") as reg:
        reg.register(make_artifact("a"), "m")
        assert reg.store.root == tmp_path / "team-store"
    with Registry(f"sqlite:///{tmp_path / 'team.db'}", store=tmp_path / "team-store") as reg:
        assert reg.get("m:1").path.is_dir()
    from modelpress.errors import RegistryError

    with pytest.raises(RegistryError, match="belongs to another registry"):
        Registry(tmp_path / "other.db", store=tmp_path / "team-store")


def test_metric_rows():
    from modelpress.registry.records import metric_kind, normalize_metrics

    rows = normalize_metrics({"latency": {"p50_ms": 3.0, "p99_ms": 5}, "acc": {"value": 0.9, "dataset": "sst2", "kind": "quality"}})
    assert [(r["name"], r["kind"], r["dataset"]) for r in rows] == [
        ("latency.p50_ms", "speed", None),
        ("latency.p99_ms", "speed", None),
        ("acc", "quality", "sst2"),
    ]
    assert [metric_kind(n) for n in ("spearman", "throughput_per_s", "size_bytes", "perplexity")] == [
        "quality",
        "speed",
        "speed",
        "quality",
    ]
    for bad in ({"x": True}, {"x": "high"}, {"x": {"value": 1, "unit": "ms"}}, {"x": {"value": 1, "kind": "vibes"}}, [("x", 1)]):
        with pytest.raises(ConfigError):
            normalize_metrics(bad)
    # A manifest's odd entries are skipped, not fatal.
    assert normalize_metrics({"x": "high", "y": {"value": 1, "kind": "vibes"}, "z": 2}, strict=False)[0]["name"] == "z"
