import numpy as np
import pytest

import modelpress as mp
from modelpress.artifacts import MANIFEST_NAME, Artifact
from modelpress.errors import ArtifactError, ConfigError, ExportError, ParityError
from modelpress.export.parity import compare_outputs


@pytest.mark.parametrize("fmt,main", [("onnx", "model.onnx"), ("openvino", "model.xml")])
def test_export_writes_a_checked_artifact(fmt, main, tiny_encoder, tmp_path):
    art = mp.export(tiny_encoder, fmt, tmp_path / "out")
    assert (tmp_path / "out" / main).is_file() and (tmp_path / "out" / MANIFEST_NAME).is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    m = art.manifest
    assert m.format == fmt and m.task == "embedding" and m.parent == mp.load(tiny_encoder).content_hash()
    assert m.metrics["parity_max_abs_diff"]["last_hidden_state"] <= m.metrics["parity_max_abs_diff"]["last_hidden_state_tolerance"]
    assert not art.verify()  # every file matches its recorded hash
    # The folder loads back as the same task and evaluates like the source.
    again = mp.load(tmp_path / "out")
    assert again.format == fmt and again.manifest.signature.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    rt = "onnxruntime" if fmt == "onnx" else "openvino"
    task = mp.task_for(again)
    emb = task.embed(mp.create_runner(again, rt), ["hello world", "a longer sentence with dynamic length"])
    ref = mp.task_for(mp.load(tiny_encoder)).embed(
        mp.create_runner(mp.load(tiny_encoder), "torch"), ["hello world", "a longer sentence with dynamic length"]
    )
    np.testing.assert_allclose(emb, ref, atol=1e-4)
    assert len(list(tmp_path.glob(".out.tmp-*"))) == 0


def test_onnx_has_dynamic_batch_and_sequence(tiny_encoder, tmp_path):
    import onnx

    mp.export(tiny_encoder, "onnx", tmp_path / "o")
    model = onnx.load(str(tmp_path / "o/model.onnx"))
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]


def test_legacy_exporter_and_onnx_to_openvino(tiny_classifier, tmp_path):
    art = mp.export(tiny_classifier, "onnx", tmp_path / "legacy", dynamo=False)
    assert art.manifest.step["exporter"].startswith("legacy")
    ov = mp.export(art, "openvino", tmp_path / "ov")
    assert ov.manifest.parent == art.content_hash()


def test_parity_failure_writes_nothing(tiny_encoder, tmp_path, monkeypatch):
    from modelpress.export import onnx as onnx_mod

    def broken(reference, candidate, batches, rtol=1e-3):
        ref = reference(batches[0])
        bad = {k: v + 1.0 for k, v in ref.items()}
        return compare_outputs(ref, bad, rtol)

    monkeypatch.setattr(onnx_mod, "check_parity", broken)
    with pytest.raises(ParityError, match="max-abs-diff 1 > tolerance") as err:
        mp.export(tiny_encoder, "onnx", tmp_path / "x")
    assert err.value.max_abs_diff == pytest.approx(1.0, rel=1e-3)
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_compare_outputs_shape_and_missing():
    ref = {"y": np.zeros((2, 3))}
    with pytest.raises(ParityError, match="shape"):
        compare_outputs(ref, {"y": np.zeros((2, 4))})
    with pytest.raises(ParityError, match="no output 'y'"):
        compare_outputs(ref, {})
    rep = compare_outputs({"y": np.full((2,), 100.0)}, {"y": np.full((2,), 100.05)})
    assert rep["y"] == pytest.approx(0.05) and rep["y_tolerance"] == pytest.approx(0.1)


def test_export_refuses_existing_folder_and_bad_format(tiny_cnn, tmp_path):
    (tmp_path / "taken").mkdir()
    art = mp.load(tiny_cnn, task="image-classification")
    with pytest.raises(ArtifactError, match="already exists"):
        mp.export(art, "onnx", tmp_path / "taken")
    with pytest.raises(ConfigError, match="Use one of onnx, openvino"):
        mp.export(art, "tflite", tmp_path / "t")
    done = mp.export(art, "onnx", tmp_path / "taken", overwrite=True)
    with pytest.raises(ExportError, match="already ONNX"):
        mp.export(done, "onnx", tmp_path / "again")


def test_exported_artifact_detects_tampering(tiny_cnn, tmp_path):
    mp.export(mp.load(tiny_cnn, task="image-classification"), "onnx", tmp_path / "a")
    with open(tmp_path / "a/model.onnx", "ab") as fh:
        fh.write(b"junk")
    assert Artifact.open(tmp_path / "a").verify() == ["model.onnx"]
