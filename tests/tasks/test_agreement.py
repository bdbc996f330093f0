"""Each task owns its fidelity measure: the metric that names it and the per-row agreement behind it.

Known answers on handmade rows, then the real tiny models against a variant whose outputs are
changed in a known way (so a wrong measure gives a wrong number), and the consumers (gate, tuner,
shadow analysis) reading the task's choice.
"""

from __future__ import annotations

import numpy as np
import pytest

import modelpress as mp
from modelpress.datasets import ImageDataset, LabeledTextDataset, PairDataset, TextCorpus
from modelpress.errors import ConfigError
from modelpress.tasks import TASKS, get_task_class

SENTENCES = [
    "A man is playing a guitar.",
    "The cat sleeps on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "Two children are building a sandcastle at the beach.",
    "Heavy rain caused flooding in several villages.",
    "Our train was delayed by almost an hour.",
]


class Changed:
    """A runner whose output ``name`` is changed by ``fn`` (a variant that differs in a known way)."""

    def __init__(self, runner, name: str, fn) -> None:
        self.runner, self.name, self.fn = runner, name, fn

    def run(self, batch):
        out = dict(self.runner.run(batch))
        out[self.name] = self.fn(out[self.name])
        return out


def test_every_task_names_one_agreement_metric_among_those_it_reports():
    assert {name: cls.agreement_metric for name, cls in TASKS.items()} == {
        "embedding": "mean_cosine",
        "text-classification": "label_agreement",
        "image-classification": "label_agreement",
        "causal-lm": "top1_agreement",
    }
    for cls in TASKS.values():
        assert cls.agreement_metric in cls.agreement_metrics


def test_the_gate_the_tuner_and_the_shadow_analysis_read_the_task():
    from modelpress.optimize.gate import AGREEMENT_METRICS, GateConfig
    from modelpress.optimize.search.front import FIDELITY
    from modelpress.rollout.analysis import agreement_rows

    for name, cls in TASKS.items():
        gate = GateConfig.for_task(name, min_agreement=0.9)
        assert (gate.thresholds[1].metric, gate.thresholds[1].min_value) == (cls.agreement_metric, 0.9)
        assert FIDELITY[name] == cls.agreement_metric
        assert set(cls.agreement_metrics) <= AGREEMENT_METRICS
    rows = [np.array([1.0, 0.0]), np.array([0.0, 2.0])]
    other = [np.array([1.0, 1.0]), np.array([0.0, -3.0])]
    np.testing.assert_allclose(agreement_rows("embedding", rows, other), [2**-0.5, -1.0])


def test_embedding_rows_are_cosines():
    cls = get_task_class("embedding")
    got = cls.agreement_rows([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], np.array([[1.0, 1.0], [0.0, -1.0], [0.0, 0.0]]))
    np.testing.assert_allclose(got, [2**-0.5, -1.0, 0.0])  # an all-zero embedding agrees with nothing
    assert cls.agreement_rows([], []).shape == (0,)
    with pytest.raises(ConfigError, match="different shapes"):
        cls.agreement_rows([np.zeros(3)], [np.zeros(4)])
    with pytest.raises(ConfigError, match="answered 2 rows and the candidate 1"):
        cls.agreement_rows([np.ones(2), np.ones(2)], [np.ones(2)])


def test_label_and_token_rows_compare_the_answer():
    a = [{"label": "pos", "label_id": 1}, {"label": "neg", "label_id": 0}, {"label": "pos", "label_id": 1}]
    b = [{"label": "pos", "label_id": 1}, {"label": "pos", "label_id": 1}, {"label": "neg", "label_id": 0}]
    for name in ("text-classification", "image-classification"):
        np.testing.assert_array_equal(get_task_class(name).agreement_rows(a, b), [1.0, 0.0, 0.0])
    tokens = get_task_class("causal-lm").agreement_rows(
        [{"next_token_id": 5}, {"next_token_id": 9}], [{"next_token_id": 5}, {"next_token_id": 8}]
    )
    np.testing.assert_array_equal(tokens, [1.0, 0.0])
    with pytest.raises(ConfigError, match="no label_id"):
        get_task_class("text-classification").agreement_rows([{"label": "pos"}], [{"label": "pos"}])
    with pytest.raises(ConfigError, match="no next_token_id"):
        get_task_class("causal-lm").agreement_rows([np.ones(2)], [np.ones(2)])


def test_embedding_agreement_is_the_mean_of_the_rows(tiny_encoder):
    art = mp.load(tiny_encoder)
    task = mp.task_for(art)
    runner = mp.create_runner(art, "torch", threads=1)
    # A variant that adds a fixed offset to every hidden state: its embeddings turn by a known angle.
    offset = np.random.default_rng(0).normal(size=32).astype(np.float32)
    variant = Changed(runner, "last_hidden_state", lambda h: h + offset)
    ds = PairDataset("t", SENTENCES[:3], SENTENCES[3:], [1.0, 2.0, 3.0])
    got = task.agreement(variant, runner, ds)
    a, b = task.embed(variant, SENTENCES), task.embed(runner, SENTENCES)
    expected = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert 0.0 < got["mean_cosine"] < 0.99  # the offset is large next to these hidden states
    assert got["mean_cosine"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert got["min_cosine"] == pytest.approx(float(expected.min()), abs=1e-6)
    # the server's per-row measure on the same texts, from postprocess results: its mean is the offline figure
    batch = task.preprocess(SENTENCES)
    rows = task.agreement_rows(list(task.postprocess(variant.run(batch), batch)), list(task.postprocess(runner.run(batch), batch)))
    assert float(rows.mean()) == pytest.approx(got["mean_cosine"], abs=1e-5)


def test_classifier_agreement_counts_changed_labels(tiny_classifier, tiny_cnn):
    art = mp.load(tiny_classifier)
    task = mp.task_for(art)
    runner = mp.create_runner(art, "torch", threads=1)
    ds = LabeledTextDataset("t", SENTENCES, [0, 1, 0, 1, 0, 1], ["negative", "positive"])
    assert task.agreement(runner, runner, ds) == {"label_agreement": 1.0}
    flipped = Changed(runner, "logits", lambda z: -z)  # two classes: every answer changes
    assert task.agreement(flipped, runner, ds) == {"label_agreement": 0.0}
    batch = task.preprocess(SENTENCES)
    rows = task.agreement_rows(task.postprocess(flipped.run(batch), batch), task.postprocess(runner.run(batch), batch))
    np.testing.assert_array_equal(rows, np.zeros(len(SENTENCES)))

    cnn = mp.load(tiny_cnn, task="image-classification")
    itask = mp.task_for(cnn)
    irunner = mp.create_runner(cnn, "torch", threads=1)
    images = np.random.default_rng(1).integers(0, 256, size=(8, 28, 28), dtype=np.uint8)
    ids = ImageDataset("t", images, np.zeros(8, dtype=np.int64))
    shifted = Changed(irunner, "logits", lambda z: np.roll(z, 1, axis=-1))  # every argmax moves to the next class
    assert itask.agreement(irunner, irunner, ids) == {"label_agreement": 1.0}
    assert itask.agreement(shifted, irunner, ids) == {"label_agreement": 0.0}


def test_causal_lm_agreement_counts_changed_tokens(tiny_llama):
    art = mp.load(str(tiny_llama))
    task = mp.task_for(art)
    runner = mp.create_runner(art, "torch", threads=1)
    corpus = TextCorpus("t", ["one two three four five six seven", "a b c d e f g h i"])
    shifted = Changed(runner, "logits", lambda z: np.roll(z, 1, axis=-1))  # the greedy token is always another
    assert task.agreement(runner, runner, corpus)["top1_agreement"] == 1.0
    assert task.agreement(shifted, runner, corpus)["top1_agreement"] == 0.0
    batch = task.preprocess(["one two three", "a b"])
    same = task.agreement_rows(task.postprocess(runner.run(batch), batch), task.postprocess(runner.run(batch), batch))
    other = task.agreement_rows(task.postprocess(shifted.run(batch), batch), task.postprocess(runner.run(batch), batch))
    np.testing.assert_array_equal(same, [1.0, 1.0])
    np.testing.assert_array_equal(other, [0.0, 0.0])
