"""The CLI end to end through Typer's runner: JSON output, exit codes, no tracebacks."""

import json

import pytest
from typer.testing import CliRunner

from modelpress.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_for_every_command():
    for cmd in ("info", "evaluate", "bench", "export", "run", "datasets", "tasks"):
        res = invoke(cmd, "--help")
        assert res.exit_code == 0 and "--json" in res.output


def test_info_json(tiny_encoder):
    res = invoke("info", tiny_encoder, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["task"] == "embedding"


def test_evaluate_json_on_a_user_file(tiny_classifier, tmp_path):
    f = tmp_path / "reviews.csv"
    f.write_text("review,label\ngreat film,1\nawful film,0\nfine,1\n")
    res = invoke("evaluate", tiny_classifier, "--data", f, "--columns", "text=review", "--json", "--reference", tiny_classifier)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["metrics"]["examples"] == 3 and data["agreement"]["label_agreement"] == 1.0


def test_bench_json_with_baseline(tiny_cnn, tmp_path):
    import modelpress as mp
    from modelpress.artifacts import Artifact  # noqa: F401

    onnx_dir = tmp_path / "cnn"
    mp.export(mp.load(tiny_cnn, task="image-classification"), "onnx", onnx_dir)
    out = tmp_path / "report.json"
    res = invoke(
        "bench",
        onnx_dir,
        "-r",
        "onnxruntime",
        "-r",
        "openvino",
        "--baseline",
        "onnxruntime",
        "--batch-sizes",
        "1,2",
        "--seconds",
        "0.05",
        "--json",
        "--output",
        out,
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["runtime"] for r in data["results"]] == ["onnxruntime", "openvino"] and "1" in data["ratios"]
    assert json.loads(out.read_text())["results"][0]["runtime"] == "onnxruntime"
    table = invoke("bench", onnx_dir, "-r", "openvino", "--baseline", "onnxruntime", "--batch-sizes", "1", "--seconds", "0.05")
    assert table.exit_code == 0 and "x)" in table.output and "items/s batch 1" in table.output


def test_export_command(tiny_cnn, tmp_path):
    import modelpress as mp

    src = mp.export(mp.load(tiny_cnn, task="image-classification"), "onnx", tmp_path / "src")
    res = invoke("export", src.path, "--format", "openvino", "-o", tmp_path / "ov")
    assert res.exit_code == 0, res.output
    assert "parity max-abs-diff" in res.output and (tmp_path / "ov/model.xml").is_file()


def test_evaluate_and_bench_run_a_variant_on_the_runtime_its_manifest_records(tiny_cnn, tmp_path):
    import numpy as np

    import modelpress as mp

    mp.export(mp.load(tiny_cnn, task="image-classification"), "onnx", tmp_path / "cnn")
    images = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(4) % 10)
    res = invoke("evaluate", tmp_path / "cnn", "--data", tmp_path / "d.npz", "--json")  # no --runtime
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["runtime"] == "onnxruntime"
    res = invoke("bench", tmp_path / "cnn", "--batch-sizes", "1", "--seconds", "0.05", "--json")
    assert res.exit_code == 0, res.output
    assert [r["runtime"] for r in json.loads(res.stdout)["results"]] == ["onnxruntime"]


@pytest.mark.parametrize(
    "args,message",
    [
        (("info", "/no/such/model"), "neither an existing path nor a known short name"),
        (("evaluate", "minilm", "--task", "translation"), "Unknown task 'translation'"),
        (("evaluate", "minilm", "--data", "no-such-data"), "Unknown dataset 'no-such-data'"),
        (("bench", "minilm", "--batch-sizes", "a,b"), "not a comma-separated list"),
        (("bench", "minilm", "-r", "tensorrt", "--seconds", "0.01", "--batch-sizes", "1", "--seq-lens", "4"), "Unknown runtime 'tensorrt'"),
        (("export", "minilm", "--format", "tflite", "-o", "/tmp/never"), "Unknown export format 'tflite'"),
        (("evaluate", "minilm", "--option", "novalue"), "is not KEY=VALUE"),
    ],
)
def test_errors_exit_2_without_traceback(args, message):
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output and "hint:" in res.output


def test_wrong_columns_exit_2(tiny_classifier, tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("a,b\nwhy,because\n")
    res = invoke("evaluate", tiny_classifier, "--data", f)
    assert res.exit_code == 2 and "no column 'text'" in res.output and "Traceback" not in res.output


def test_model_that_does_not_fit_the_task_exit_2(tiny_encoder):
    res = invoke("evaluate", tiny_encoder, "--task", "text-classification", "--data", "sst2-dev", "--limit", "4")
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_datasets_and_tasks_lists():
    assert "stsb-dev" in json.loads(invoke("datasets", "--json").stdout)
    assert set(json.loads(invoke("tasks", "--json").stdout)) == {"embedding", "text-classification", "image-classification", "causal-lm"}
