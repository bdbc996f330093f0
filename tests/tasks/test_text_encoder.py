"""The one text encoder: per-text encoding plus per-batch padding equals the tokenizer's own padded call."""

from __future__ import annotations

import numpy as np
import pytest

import modelpress as mp
from modelpress.errors import TaskMismatchError
from modelpress.tasks.text import TextEncoder

TEXTS = ["A man is playing a guitar.", "Short.", "The committee will publish its report on the new bridge next week, " * 40]


def _hf(tokenizer, texts, names, **kwargs):
    enc = tokenizer(texts, truncation=True, return_tensors="np", **kwargs)
    out = {n: np.asarray(enc[n], dtype=np.int64) for n in names if n in enc}
    if "token_type_ids" in names and "token_type_ids" not in enc:
        out["token_type_ids"] = np.zeros_like(out["input_ids"])
    return out


@pytest.mark.parametrize("fixture", ["tiny_encoder", "tiny_classifier", "tiny_llama"])
def test_preprocess_equals_the_tokenizers_padded_call(fixture, request):
    task = mp.task_for(mp.load(str(request.getfixturevalue(fixture))))
    enc = task.encoder
    assert isinstance(enc, TextEncoder) and enc is task.encoder  # made once per task
    ours = task.preprocess(TEXTS)
    theirs = _hf(task.tokenizer, TEXTS, enc.names, padding=True, max_length=enc.max_length)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert ours["input_ids"].shape[1] == enc.max_length  # the long text was cut to the model's length
    # exactly seq_len tokens: cut and padded as padding="max_length" does
    fixed = task.preprocess(TEXTS, seq_len=12)
    theirs = _hf(task.tokenizer, TEXTS, enc.names, padding="max_length", max_length=12)
    for name in theirs:
        np.testing.assert_array_equal(fixed[name], theirs[name])
    assert enc.lengths(TEXTS) == [int(m.sum()) for m in ours["attention_mask"]]


def test_encode_then_collate_pads_each_batch_on_the_tokenizers_side(tiny_encoder):
    task = mp.task_for(mp.load(str(tiny_encoder)))
    enc = task.encoder
    rows = enc.encode(TEXTS[:2])
    batch = enc.collate(rows, pad_to=20)
    assert batch["input_ids"].shape == (2, 20)
    assert batch["attention_mask"].sum(1).tolist() == [len(ids) for ids, _ in rows]
    assert (batch["input_ids"][:, -1] == enc.pad_id).all()  # BERT pads on the right
    left = TextEncoder(task.tokenizer, enc.max_length, enc.names)
    left.left = True
    padded = left.collate(rows)
    assert padded["attention_mask"][1, -1] == 1 and padded["attention_mask"][1, 0] == 0


def test_no_tokenizer_is_a_clear_error():
    with pytest.raises(TaskMismatchError, match="no tokenizer"):
        TextEncoder(None, 16, ["input_ids"])
