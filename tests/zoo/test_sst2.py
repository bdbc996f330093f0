"""minilm-sst2: a short fine-tuning run (the full one is scripts/train_sst2.py) and the folder it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import modelpress as mp
from modelpress.zoo.sst2 import Sst2TrainConfig, _batches

# The session fixture sst2_short (tests/conftest.py) runs 60 steps of 32 phrases: about 0.80 on
# the first 400 dev sentences (chance: 0.5, the majority class 0.51); 0.75 fails on a broken
# head, labels, schedule or loading.
MIN_SHORT_RUN_ACCURACY = 0.75


def test_batches_cover_every_example_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(2, 60, size=1000)]
    batches = _batches(lengths, 32, np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.15 * sum(lengths)  # random batches would pad to about 1.9x


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="max_step"):
        Sst2TrainConfig(max_step=10)


@pytest.mark.slow
@pytest.mark.needs_data
def test_short_run_learns_and_writes_a_plain_hf_classifier(data_dir, sst2_short):
    art = sst2_short
    acc = art.manifest.metrics["accuracy"]
    assert acc["dataset"] == "sst2-dev" and art.manifest.metrics["eval_examples"] == 400
    assert acc["value"] >= MIN_SHORT_RUN_ACCURACY
    assert art.manifest.step["steps"] == 60 and art.manifest.step["recipe"]["max_steps"] == 60

    folder = art.path
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "modelpress.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)  # no pickle
    assert "modules.json" not in names  # a classifier, not a sentence-transformers folder
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"}

    loaded = mp.load(str(folder))
    assert loaded.task == "text-classification" and loaded.manifest.task_config["labels"] == ["negative", "positive"]
    again = mp.evaluate(loaded, data="sst2-dev", data_dir=data_dir, limit=400, threads=1)
    assert again["metrics"]["accuracy"] == acc["value"]
    out = mp.create_runner(loaded, "torch", threads=1)
    task = mp.task_for(loaded)
    batch = task.preprocess(["a wonderful, moving film", "a dull and tedious mess"])
    assert [r["label"] for r in task.postprocess(out.run(batch), batch)] == ["positive", "negative"]
