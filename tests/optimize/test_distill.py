"""Distillation: student initialisation, losses that decrease, the saved student, caching, recipes."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import modelpress
from modelpress.errors import ConfigError, DatasetError, OptimizationError
from modelpress.optimize.configs import parse_step
from modelpress.optimize.distill.distill import Distill, distill, layer_plan, take_layers
from modelpress.optimize.train.loop import train
from modelpress.optimize.train.objectives import Objective, TrainData, TrainingSpec

# the (technique, runtime) pairs this file tests (read by the handler-completeness test)
COVERED = {("Distill", "torch")}

SUBJECTS = ["the cat", "a young doctor", "my neighbour", "the old train", "two children", "the committee", "a red car", "the river"]
VERBS = ["watched", "crossed", "painted", "ignored", "followed", "described", "built", "moved past"]
OBJECTS = ["the bridge", "a quiet street", "the evening news", "an empty field", "the last page", "a small boat", "the market"]


def sentences(n: int) -> list[str]:
    combos = itertools.product(SUBJECTS, VERBS, OBJECTS)
    return [f"{s} {v} {o}" for (s, v, o), _ in zip(combos, range(n), strict=False)]


def test_layer_plans():
    assert layer_plan(6, None) == [0, 2, 4]  # every other layer, as DistilBERT
    assert layer_plan(6, 3) == [0, 3, 5]  # evenly, first and last kept
    assert layer_plan(12, 4) == [0, 4, 7, 11]
    assert layer_plan(6, 1) == [5]
    assert layer_plan(6, [1, 4]) == [1, 4]
    with pytest.raises(OptimizationError, match="cannot take 7"):
        layer_plan(6, 7)
    with pytest.raises(OptimizationError, match=r"layers 0\.\.5"):
        layer_plan(6, [0, 6])


def test_config_round_trips_and_rejects_bad_values():
    cfg = parse_step({"technique": "distill", "layers": 3, "training": {"max_steps": 40, "eval_every": 20, "hidden_weight": 1.0}})
    assert parse_step(json.loads(cfg.to_json())) == cfg
    assert parse_step(__import__("yaml").safe_load(cfg.to_yaml())) == cfg
    assert cfg.label() == "distill@torch(layers=3, training.max_steps=40, training.eval_every=20, training.hidden_weight=1.0)"
    with pytest.raises(ConfigError, match="increasing order"):
        Distill(layers=[3, 1])
    with pytest.raises(ConfigError, match="not both"):
        Distill(layers=2, student_config={"num_hidden_layers": 2})
    with pytest.raises(ConfigError, match="Did you mean 'max_seconds'"):
        Distill(training={"max_second": 5})


def test_take_layers_keeps_the_chosen_layers_and_renumbers_them(tiny_llama):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    student = take_layers(teacher, [1])
    assert student.config.num_hidden_layers == 1 and len(student.model.layers) == 1
    assert student.model.layers[0].self_attn.layer_idx == 0
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert teacher.config.num_hidden_layers == 2 and len(teacher.model.layers) == 2  # the teacher is untouched
    ids = torch.tensor([[101, 2023, 2003, 102]])
    assert student(input_ids=ids).logits.shape == (1, 4, teacher.config.vocab_size)


def _mean_loss(obj: Objective, model, steps=range(4)) -> float:
    with torch.no_grad():
        return float(np.mean([float(obj.loss(model, s)) for s in steps]))


def _teacher_student(path, task_name, plan=(1,)):
    from modelpress.tasks import task_for

    task = task_for(modelpress.load(str(path)))
    teacher = task.auto_model_class().from_pretrained(str(path)).eval()
    return task, teacher, take_layers(teacher, list(plan))


@pytest.mark.parametrize("hidden_weight", [0.0, 1.0])
def test_embedding_distillation_loss_decreases(tiny_encoder, hidden_weight):
    task, teacher, student = _teacher_student(tiny_encoder, "embedding")
    torch.manual_seed(0)
    with torch.no_grad():  # a random tiny teacher's single layer barely moves its embeddings: start the student off
        for p in student.encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    spec = TrainingSpec(max_steps=25, lr=1e-3, batch_size=8, eval_every=None, warmup=0.0, hidden_weight=hidden_weight)
    obj = Objective(task, teacher, TrainData(texts=sentences(80)), spec, layer_map=[1], wrap=task.wrap_module)
    before = _mean_loss(obj, student)
    train(student, obj.loss, spec)
    after = _mean_loss(obj, student)
    assert after < 0.75 * before, (before, after)


def test_classifier_soft_and_hard_label_loss_decreases(tiny_classifier):
    task, teacher, student = _teacher_student(tiny_classifier, "text-classification")
    texts = sentences(128)
    labels = np.asarray([SUBJECTS.index(next(x for x in SUBJECTS if t.startswith(x))) % 2 for t in texts], dtype=np.int64)  # learnable
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.bert.encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    spec = TrainingSpec(max_steps=25, lr=5e-3, batch_size=8, eval_every=None, warmup=0.0, alpha=0.5, temperature=2.0)
    obj = Objective(task, teacher, TrainData(texts=texts, labels=labels), spec, wrap=task.wrap_module)
    before = _mean_loss(obj, student)
    train(student, obj.loss, spec)
    after = _mean_loss(obj, student)
    assert after < 0.8 * before, (before, after)


def test_causal_lm_logit_kl_decreases(tiny_llama):
    task, teacher, student = _teacher_student(tiny_llama, "causal-lm")
    spec = TrainingSpec(
        max_steps=20,
        lr=3e-3,
        batch_size=4,
        max_length=16,
        eval_every=None,
        warmup=0.0,
        alpha=1.0,
        validation_samples=10,
        freeze_embeddings=False,
    )
    obj = Objective(task, teacher, TrainData(texts=["\n".join(sentences(200))]), spec, wrap=task.wrap_module)
    assert obj.can_evaluate and not obj.higher_is_better  # perplexity on held-out chunks
    before = _mean_loss(obj, student)
    train(student, obj.loss, spec)
    assert _mean_loss(obj, student) < before


def test_training_on_a_scored_split_is_refused(tiny_encoder, tmp_path):
    with pytest.raises(DatasetError, match="gate scores on"):
        distill(str(tiny_encoder), tmp_path / "s", {"layers": 1, "training": {"data": ["stsb-dev"], "max_steps": 2, "eval_every": None}})


def _text_file(tmp_path, n=240):
    path = tmp_path / "unlabeled.txt"
    path.write_text("\n".join(sentences(n)) + "\n")
    return path


def test_distilled_student_is_a_normal_cached_artifact(tiny_encoder, tmp_path):
    data = _text_file(tmp_path)
    cfg = {
        "layers": 1,
        "training": {"data": [str(data)], "max_steps": 30, "eval_every": 15, "lr": 2e-3, "batch_size": 16, "validation_samples": 40},
    }
    art = distill(str(tiny_encoder), tmp_path / "student", cfg)
    saved = json.loads((art.path / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1 and saved["hidden_size"] == 32
    assert json.loads((art.path / "modules.json").read_text())[1]["path"] == "1_Pooling" and (art.path / "1_Pooling/config.json").is_file()
    m = art.manifest.metrics["technique"]
    assert (m["teacher_layers"], m["student_layers"], m["layer_map"], m["cached"]) == (2, 1, [1], False)
    assert m["student_parameters"] < m["teacher_parameters"] and m["train_examples"] == 200
    assert m["validation"].startswith("held-out texts (40")
    hist = [h["metric"] for h in m["training"]["history"] if "metric" in h]
    assert len(hist) == 3 and m["training"]["best_metric"] == max(hist)  # at steps 0, 15 and 30; the best is kept

    loaded = modelpress.load(art.path)
    assert (
        loaded.task == "embedding" and loaded.manifest.task_config["pooling"] == "mean" and loaded.manifest.task_config["normalize"] is True
    )
    result = modelpress.evaluate(loaded, data=str(_pairs_file(tmp_path)), task="embedding")
    assert -1.0 <= result["metrics"]["spearman"] <= 1.0

    again = distill(str(tiny_encoder), tmp_path / "student-again", cfg)  # the same step: from the cache, not retrained
    assert again.manifest.metrics["technique"]["cached"] is True
    assert again.manifest.files["model.safetensors"] == art.manifest.files["model.safetensors"]

    onnx = modelpress.export(loaded, "onnx", tmp_path / "onnx", dynamo=False)
    assert (
        onnx.manifest.metrics["parity_max_abs_diff"]["last_hidden_state"]
        <= onnx.manifest.metrics["parity_max_abs_diff"]["last_hidden_state_tolerance"]
    )


def _pairs_file(tmp_path):
    path = tmp_path / "pairs.csv"
    s = sentences(60)
    rows = ["sentence1,sentence2,score"] + [f"{a},{b},{(i % 6) * 1.0}" for i, (a, b) in enumerate(zip(s[:30], s[30:], strict=True))]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_recipe_distill_then_int8(tiny_encoder, tmp_path):
    from modelpress.optimize.recipe import run_recipe

    recipe = {
        "gate": {"spearman": {"min_value": -1.0}},  # a random tiny model: only the chain is checked here
        "steps": [
            {
                "technique": "distill",
                "layers": 1,
                "training": {"data": [str(_text_file(tmp_path))], "max_steps": 10, "eval_every": None, "validation_samples": 0},
            },
            {"technique": "dynamic-int8", "runtime": "onnxruntime", "fuse": False},
        ],
    }
    res = run_recipe(str(tiny_encoder), recipe, tmp_path / "out", data=str(_pairs_file(tmp_path)), task="embedding")
    assert [s.shipped for s in res.steps] == [True, True], [s.error for s in res.steps]
    first, second = (modelpress.artifacts.Artifact.open(s.path) for s in res.steps)
    assert first.manifest.step["technique"] == "distill" and first.format == "hf"
    assert second.manifest.parent == first.content_hash() and second.format == "onnx"


@pytest.mark.needs_data
def test_minilm_short_distillation_beats_the_undistilled_student(data_dir, tmp_path, minilm_path):
    """MiniLM's first three layers (a student that lacks the top of the network) distilled on 400
    unlabeled sentences for 60 steps: STS-B dev Spearman rises well above the same layers untrained."""
    from modelpress.optimize.distill.distill import copy_sentence_transformers_files
    from modelpress.optimize.evaluation import Evaluator
    from modelpress.tasks import task_for

    teacher_art = modelpress.load("minilm")
    cfg = Distill(
        layers=[0, 1, 2],
        training={
            "max_steps": 60,
            "eval_every": None,
            "samples": 400,
            "validation_samples": 0,
            "batch_size": 16,
            "lr": 2e-4,
            "warmup": 0.1,
            "max_seconds": 240,
        },
    )
    student = distill(teacher_art, tmp_path / "student", cfg, data_dir=data_dir)
    assert student.manifest.metrics["technique"]["train_examples"] == 400

    # The same three layers, untrained, saved the same way.
    task = task_for(teacher_art)
    init = take_layers(task.auto_model_class().from_pretrained(str(minilm_path)), [0, 1, 2])
    folder = tmp_path / "init"
    init.save_pretrained(str(folder))
    task.tokenizer.save_pretrained(str(folder))
    copy_sentence_transformers_files(minilm_path, folder)
    undistilled = modelpress.load(folder)
    ev = Evaluator(teacher_art, data="stsb-dev", data_dir=data_dir, limit=300, threads=1)
    got = ev.evaluate(student, "torch")["metrics"]["spearman"]
    base = ev.evaluate(undistilled, "torch")["metrics"]["spearman"]
    assert got > base + 0.03, (base, got)


def test_distill_command_prints_the_gate_table_and_the_speed_ratio(tiny_encoder, tmp_path):
    from typer.testing import CliRunner

    from modelpress.cli import app

    args = [
        "distill",
        str(tiny_encoder),
        "--layers",
        "1",
        "--data",
        str(_text_file(tmp_path)),
        "--max-steps",
        "4",
        "-o",
        str(tmp_path / "s"),
    ]
    res = CliRunner().invoke(
        app, [*args, "--eval-data", str(_pairs_file(tmp_path)), "--task", "embedding", "--max-drop", "99%", "--bench-rounds", "2"]
    )
    assert res.exit_code in (0, 4), res.output  # 4: the gate failed (a random tiny teacher's Spearman is noise)
    assert "spearman" in res.output and "measured side by side" in res.output and "2 -> 1 layers" in res.output
    assert ("gate passed" in res.output) == (res.exit_code == 0)
    res = CliRunner().invoke(app, ["distill", str(tiny_encoder), "--layers", "2", "--layer-map", "0,1"])
    assert res.exit_code == 2 and "not both" in res.output
    assert "--json" in CliRunner().invoke(app, ["distill", "--help"]).output


def test_the_cache_entry_is_replaced_atomically(tmp_path):
    """A failed save leaves the old entry as it was (it used to be deleted before the new one was in)."""
    from modelpress.optimize.distill.distill import store_in_cache

    folder = tmp_path / "cache" / "key"
    store_in_cache(folder, lambda tmp: (tmp / "weights").write_text("old"))

    def broken(tmp):
        (tmp / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store_in_cache(folder, broken)
    assert (folder / "weights").read_text() == "old"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["key"]  # no temporary folder left behind
    store_in_cache(folder, lambda tmp: (tmp / "weights").write_text("new"))
    assert (folder / "weights").read_text() == "new" and sorted(p.name for p in folder.parent.iterdir()) == ["key"]
