import numpy as np
import pytest

import modelpress as mp
from modelpress.datasets import ImageDataset
from modelpress.errors import InvalidInputError
from modelpress.tasks.image_classification import ImageClassificationTask

# A small CNN trained 2 epochs on 5,000 images reaches about 96-97% on MNIST test; 0.9 leaves room
# for run-to-run noise while still failing on a broken pipeline (chance is 0.1).
MNIST_MIN_ACCURACY = 0.9


def test_preprocess_normalises_and_checks_shapes():
    task = ImageClassificationTask()
    x = task.preprocess(np.zeros((2, 28, 28), dtype=np.uint8))["pixel_values"]
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32
    assert x[0, 0, 0, 0] == pytest.approx(-0.1307 / 0.3081)
    with pytest.raises(InvalidInputError, match="shape"):
        task.preprocess(np.zeros((2, 32, 32), dtype=np.uint8))
    with pytest.raises(InvalidInputError, match="No images"):
        task.preprocess(np.zeros((0, 28, 28), dtype=np.uint8))


def test_module_evaluates_like_direct_argmax(tiny_cnn):
    import torch

    art = mp.load(tiny_cnn, task="image-classification")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=20)
    task = mp.task_for(art)
    m = task.evaluate(mp.create_runner(art, "torch"), ImageDataset("r", images, labels), batch_size=7)
    with torch.no_grad():
        pred = tiny_cnn(torch.from_numpy(task.preprocess(images)["pixel_values"])).argmax(1).numpy()
    assert m["accuracy"] == pytest.approx(float((pred == labels).mean()))
    assert "macro_f1" in m


@pytest.mark.needs_data
@pytest.mark.slow
def test_trained_cnn_on_mnist_test_all_runtimes(trained_mnist_cnn, data_dir):
    art = mp.load(trained_mnist_cnn, task="image-classification", name="mnist-cnn")
    accs = {
        rt: mp.evaluate(art, data="mnist-test", runtime=rt, data_dir=data_dir)["metrics"]["accuracy"]
        for rt in ("torch", "onnxruntime", "openvino")
    }
    assert accs["torch"] >= MNIST_MIN_ACCURACY
    # Exported graphs give the same predictions up to fp32 noise on a handful of borderline images.
    assert abs(accs["onnxruntime"] - accs["torch"]) <= 0.001 and abs(accs["openvino"] - accs["torch"]) <= 0.001
