"""Handlers: per-request tokenizing + per-batch padding (the task's own encoder) equals the task's preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

import modelpress as mp
from modelpress.errors import ConfigError, InvalidInputError
from modelpress.serving.config import BatchConfig, ModelConfig
from modelpress.serving.handlers import ImageHandler, TextHandler, handler_for

TEXTS = ["A man is playing a guitar.", "Short.", "The committee will publish its report on the new bridge next week."]


@pytest.fixture(scope="module")
def encoder(tiny_encoder):
    art = mp.load(str(tiny_encoder))
    return mp.task_for(art), mp.create_runner(art, "torch", threads=1)


def test_rows_padded_per_batch_equal_the_task_preprocessing(encoder):
    task, runner = encoder
    h = TextHandler(task, runner)
    assert h.encoder is task.encoder  # one encoder: the server tokenizes and pads with the task's own
    decoded = h.decode(TEXTS)
    assert decoded.lengths == [len(ids) for ids, _ in decoded.rows]
    assert decoded.tokens == sum(decoded.lengths)
    ours, theirs = h.collate(decoded.rows), task.preprocess(TEXTS)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name])
    # and the results are the task's: same embeddings as postprocess(run(preprocess))
    np.testing.assert_allclose(np.stack(h.work(decoded.rows)), task.postprocess(runner.run(theirs), theirs), rtol=0, atol=1e-6)


def test_pad_to_length_pads_every_batch_to_that_length(encoder):
    task, runner = encoder
    h = TextHandler(task, runner, pad_to_length=40)
    batch = h.collate(h.decode(TEXTS[:2]).rows)
    assert batch["input_ids"].shape == (2, 40)
    assert batch["attention_mask"].sum() == sum(h.decode(TEXTS[:2]).lengths)


def test_text_checks_each_input(encoder):
    task, runner = encoder
    h = TextHandler(task, runner, max_text_chars=50)
    with pytest.raises(InvalidInputError, match="no inputs"):
        h.decode([])
    with pytest.raises(InvalidInputError, match="Input 1 is a int"):
        h.decode(["fine", 3])
    with pytest.raises(InvalidInputError, match="at most 50 per text"):
        h.decode(["x" * 51])
    with pytest.raises(InvalidInputError, match="not a token id"):
        h.decode_ids([[101, 10**9]])
    long_ids = h.decode_ids([[101] * 1000])
    assert long_ids.lengths == [h.max_length]  # cut to the model's length, as text is


def test_image_handler_checks_shape_dtype_and_non_finite(tiny_cnn):
    art = mp.load(tiny_cnn, task="image-classification")
    task = mp.task_for(art)
    h = ImageHandler(task, mp.create_runner(art, "torch", threads=1))
    rows = h.decode(np.zeros((2, 28, 28), dtype=np.uint8)).rows
    assert len(rows) == 2 and rows[0].shape == (1, 28, 28)
    assert len(h.work(rows)) == 2
    bad = np.zeros((1, 28, 28), dtype=np.float32)
    bad[0, 3, 3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        h.decode(bad)
    with pytest.raises(InvalidInputError, match="shape"):
        h.decode(np.zeros((1, 32, 32), dtype=np.uint8))
    with pytest.raises(InvalidInputError, match="numbers"):
        h.decode([["a", "b"]])
    assert ImageHandler(task, None, allow_non_finite=True).decode(bad).rows  # the policy can allow it


def test_causal_lm_is_refused_with_a_clear_message(tiny_llama):
    art = mp.load(str(tiny_llama))
    with pytest.raises(ConfigError, match="not supported yet"):
        handler_for(mp.task_for(art), None, ModelConfig(source="x", batching=BatchConfig()))
