import numpy as np
import pytest

import modelpress as mp
from modelpress.datasets import LabeledTextDataset
from modelpress.errors import TaskMismatchError
from modelpress.tasks.text_classification import classification_metrics, map_labels, softmax


def test_metrics_exact():
    pred = np.array([0, 1, 2, 2, 1, 0])
    gold = np.array([0, 1, 2, 1, 1, 2])
    m = classification_metrics(pred, gold, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1 = 2tp / (2tp + fp + fn): c0 tp1 fp1 fn0 -> 2/3; c1 tp2 fp0 fn1 -> 4/5; c2 tp1 fp1 fn1 -> 1/2
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 1 / 2) / 3)
    assert "macro_f1" not in classification_metrics(pred % 2, gold % 2, 2)


def test_softmax_rows_sum_to_one():
    p = softmax(np.array([[1000.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert p[0, 0] == pytest.approx(1.0)


def test_label_mapping_by_name_and_position():
    ds = LabeledTextDataset("d", ["a", "b"], [0, 1], ["positive", "negative"])
    np.testing.assert_array_equal(map_labels(["negative", "positive"], ds), [1, 0])
    ds2 = LabeledTextDataset("d", ["a", "b"], [0, 1], ["x", "y"])
    np.testing.assert_array_equal(map_labels(["LABEL_0", "LABEL_1"], ds2), [0, 1])
    ds3 = LabeledTextDataset("d", ["a"], [5], [str(i) for i in range(6)])
    with pytest.raises(TaskMismatchError, match="6 classes"):
        map_labels(["LABEL_0", "LABEL_1"], ds3)


def test_evaluate_matches_direct_prediction(tiny_classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    art = mp.load(tiny_classifier)
    assert art.task == "text-classification" and art.manifest.task_config["labels"] == ["negative", "positive"]
    texts = ["good film", "bad film", "an utterly dreadful waste of time", "wonderful", "meh"]
    labels = [1, 0, 0, 1, 1]
    ds = LabeledTextDataset("toy", texts, labels, ["negative", "positive"])
    metrics = mp.task_for(art).evaluate(mp.create_runner(art, "torch", threads=1), ds, batch_size=2)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_classifier)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_classifier))
    with torch.no_grad():
        pred = [int(model(**tok([t], return_tensors="pt")).logits.argmax()) for t in texts]
    assert metrics["accuracy"] == pytest.approx(np.mean(np.array(pred) == np.array(labels)))


def test_postprocess_gives_labels(tiny_classifier):
    art = mp.load(tiny_classifier)
    task = mp.task_for(art)
    batch = task.preprocess(["fine", "awful"])
    res = task.postprocess(mp.create_runner(art, "torch").run(batch), batch)
    assert [r["label"] for r in res] == [["negative", "positive"][r["label_id"]] for r in res]
    assert all(abs(sum(r["scores"]) - 1) < 1e-5 for r in res)


@pytest.mark.needs_data
def test_sst2_and_trec_evaluate(data_dir, tiny_classifier):
    """Real readers through the task: a random head scores near chance, and TREC's 6 classes are refused."""
    r = mp.evaluate(tiny_classifier, data="sst2-dev", data_dir=data_dir, limit=64)
    assert r["metrics"]["examples"] == 64 and 0.0 <= r["metrics"]["accuracy"] <= 1.0
    with pytest.raises(TaskMismatchError, match="6 classes"):
        mp.evaluate(tiny_classifier, data="trec-test", data_dir=data_dir, limit=16)
