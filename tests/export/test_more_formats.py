"""The AOTInductor and TorchScript formats on the real MiniLM: exported, parity-checked on their runners, served, benched.

MiniLM is compiled by AOTInductor once for the whole session (about 12 s on an idle 2-core
machine, a minute under load): the export goes through the export cache, so ``create_runner``,
the CLI export and the bench reuse the package.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import modelpress as mp
from modelpress.artifacts import MANIFEST_NAME, Artifact
from modelpress.cli import app
from modelpress.errors import ArtifactError, BackendUnavailableError, ConfigError, ExportError, InvalidInputError, UnknownRuntimeError
from modelpress.locations import cache_dir
from modelpress.runtimes import runtime_of

TEXTS = ["a short one", "a rather longer sentence, so that the batch is padded to its length"]
EMBEDDING_ATOL = 1e-4  # fp32 kernels that fuse and reorder sums move MiniLM's embeddings by about 1e-6


@pytest.fixture(scope="session")
def minilm():
    return mp.load("minilm")


@pytest.fixture(scope="session")
def reference(minilm):
    return _embed(minilm, "torch")


@pytest.fixture(scope="session")
def aoti_dir(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("aoti") / "minilm-aoti"
    mp.export(minilm, "aoti", out)
    return out


@pytest.fixture(scope="session")
def torchscript_dir(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("ts") / "minilm-ts"
    mp.export(minilm, "torchscript", out)
    return out


def _embed(art, runtime):
    return mp.task_for(art).embed(mp.create_runner(art, runtime, threads=2), TEXTS)


@pytest.mark.parametrize("fmt,main", [("aoti", "model.pt2"), ("torchscript", "model.pt")])
def test_export_is_checked_on_its_runner_and_serves_like_the_source(fmt, main, minilm, reference, request):
    folder = request.getfixturevalue(f"{fmt}_dir")
    assert (folder / main).is_file() and (folder / MANIFEST_NAME).is_file() and (folder / "tokenizer.json").is_file()
    art = mp.load(folder)
    m = art.manifest
    assert m.format == fmt and m.task == "embedding" and m.parent == minilm.content_hash()
    parity = m.metrics["parity_max_abs_diff"]
    assert 0 <= parity["last_hidden_state"] <= parity["last_hidden_state_tolerance"]
    assert m.step["dynamic_axes"] == {"batch": [1, None], "sequence": [1, 512]}
    assert not art.verify()
    assert runtime_of(art) == fmt  # the folder runs on its own runtime by default
    np.testing.assert_allclose(_embed(art, fmt), reference, atol=EMBEDDING_ATOL)


@pytest.mark.parametrize("fmt", ["aoti", "torchscript"])
def test_batch_and_sequence_stay_dynamic_and_out_of_range_is_refused(fmt, request):
    art = mp.load(request.getfixturevalue(f"{fmt}_dir"))
    runner = mp.create_runner(art, fmt, threads=2)
    for batch, seq in [(1, 1), (3, 37)]:
        ids = np.full((batch, seq), 1037, dtype=np.int64)
        out = runner.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        assert out["last_hidden_state"].shape == (batch, seq, 384) and np.isfinite(out["last_hidden_state"]).all()
    ids = np.ones((1, 513), dtype=np.int64)
    with pytest.raises(InvalidInputError, match=r"sequence 513.*1\.\.512"):
        runner.run({"input_ids": ids, "attention_mask": ids})


def test_runner_compiles_through_the_export_cache(minilm, aoti_dir):
    runner = mp.create_runner(minilm, "aoti", threads=2).load()  # the session's package, not a second compile
    served = runner.loaded_artifact
    assert served.format == "aoti" and cache_dir("exports") in served.path.parents
    assert served.manifest.files == Artifact.open(aoti_dir).manifest.files
    assert runner.describe()["runtime"] == "aoti"


def test_a_package_for_other_vector_instructions_or_tampered_is_refused(aoti_dir, tmp_path):
    art = mp.load(aoti_dir)
    foreign = Artifact(art.manifest.model_copy(update={"step": {**art.manifest.step, "vec_isa": "neon"}}), art.path)
    with pytest.raises(BackendUnavailableError, match="compiled for the neon vector instructions"):
        mp.create_runner(foreign, "aoti").load()
    copy = tmp_path / "copy"
    shutil.copytree(aoti_dir, copy)
    with open(copy / "model.pt2", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="no longer match the hashes"):
        mp.create_runner(mp.load(copy), "aoti").load()


def test_bad_input_gets_a_clear_error(minilm, aoti_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)Unknown export format 'pt3'.*onnx, openvino, aoti, torchscript"):
        mp.export(minilm, "pt3", tmp_path / "x")
    with pytest.raises(UnknownRuntimeError, match=r"Known runtimes: .*aoti"):
        mp.create_runner(minilm, "aot")
    with pytest.raises(ExportError, match="is a aoti artifact; the torchscript export starts from the PyTorch model"):
        mp.export(mp.load(aoti_dir), "torchscript", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_export_and_one_bench_table(aoti_dir, torchscript_dir, tmp_path):
    cli = CliRunner()
    res = cli.invoke(app, ["export", "minilm", "--format", "aoti", "-o", str(tmp_path / "cli-aoti"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["format"] == "aoti"
    args = ["bench", "minilm", "-r", "torch", "-r", "aoti", "-r", "torchscript", "--baseline", "torch"]
    res = cli.invoke(app, [*args, "--batch-sizes", "1", "--seq-lens", "16", "--seconds", "0.2", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [r["runtime"] for r in report["results"]] == ["torch", "aoti", "torchscript"]
    assert all(r["throughput"] and r["latency_ms"] for r in report["results"]), report["results"]
    assert set(report["ratios"]) == {"1", "2"}


@pytest.mark.slow  # lowering takes minutes under load even for a 2-layer encoder
def test_executorch_program_is_checked_and_runs_batches_past_its_maximum(tiny_encoder, tmp_path):
    pytest.importorskip("executorch", reason="the executorch format needs executorch (pip install 'modelpress[executorch]')")
    source = mp.load(tiny_encoder)
    art = mp.export(source, "executorch", tmp_path / "et", max_batch=4)
    parity = art.manifest.metrics["parity_max_abs_diff"]
    assert parity["last_hidden_state"] <= parity["last_hidden_state_tolerance"]
    assert art.manifest.step["dynamic_axes"] == {"batch": [1, 4], "sequence": [1, 128]} and runtime_of(art) == "executorch"
    ids = np.random.default_rng(0).integers(1000, 2000, size=(10, 9))  # 10 rows: three pieces of at most 4
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got = mp.create_runner(mp.load(tmp_path / "et"), "executorch").run(batch)["last_hidden_state"]
    ref = mp.create_runner(source, "torch").run(batch)["last_hidden_state"]
    np.testing.assert_allclose(got, ref, atol=EMBEDDING_ATOL)
    with pytest.raises(InvalidInputError, match=r"sequence 129"):
        mp.create_runner(art, "executorch").run({"input_ids": np.ones((1, 129), dtype=np.int64), "attention_mask": np.ones((1, 129))})
    with pytest.raises(ConfigError, match="max_batch must be a positive integer"):
        mp.export(source, "executorch", tmp_path / "bad", max_batch=0)
