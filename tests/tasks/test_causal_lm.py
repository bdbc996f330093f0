import math

import numpy as np
import pytest

import modelpress as mp
from modelpress.datasets import TextCorpus
from modelpress.tasks.causal_lm import windows

# stories260k's perplexity on the TinyStories sample is about 3.55 (shared data README); the
# issue allows 2%.
STORIES_PPL = 3.55
STORIES_REL_TOL = 0.02


@pytest.mark.parametrize("n,context,stride", [(10, 4, 2), (100, 16, 16), (7, 512, 256), (33, 8, 3)])
def test_windows_score_every_token_once(n, context, stride):
    scored = []
    for b, e, first in windows(n, context, stride):
        assert e - b <= context and b < first <= e
        scored.extend(range(first, e))
    assert scored == list(range(1, n))


def test_perplexity_equals_hf_loss(tiny_llama):
    """One short document inside the context: our perplexity is exp(HF's mean loss)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "the quick brown fox jumps over the lazy dog and runs away"
    art = mp.load(tiny_llama)
    assert art.task == "causal-lm"
    task = mp.task_for(art)
    m = task.evaluate(mp.create_runner(art, "torch", threads=1), TextCorpus("t", [text]))
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    ids = tok(text, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert m["tokens"] == ids.shape[1] - 1
    assert m["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_sliding_window_stream(tiny_llama):
    art = mp.load(tiny_llama)
    art.manifest.task_config.update({"context": 16, "stride": 8})
    task = mp.task_for(art)
    corpus = TextCorpus("s", ["word " * 60], mode="stream")
    m = task.evaluate(mp.create_runner(art, "torch"), corpus, batch_size=3)
    assert m["context"] == 16 and m["stride"] == 8 and m["tokens"] == len(task.encode("word " * 60)) - 1
    assert math.isfinite(m["perplexity"])


def test_next_token_postprocess(tiny_llama):
    art = mp.load(tiny_llama)
    task = mp.task_for(art)
    batch = task.preprocess(["hello there", "a much longer prompt than the first"])
    res = task.postprocess(mp.create_runner(art, "torch").run(batch), batch)
    assert len(res) == 2 and all(r["logprob"] <= 0 for r in res)
    # The padded row's next token equals the unpadded computation.
    single = task.preprocess(["hello there"])
    alone = task.postprocess(mp.create_runner(art, "torch").run(single), single)[0]
    assert alone["next_token_id"] == res[0]["next_token_id"]


@pytest.mark.needs_data
def test_stories260k_perplexity(data_dir):
    r = mp.evaluate(data_dir / "models/stories260k", data="tinystories", data_dir=data_dir)
    assert r["task"] == "causal-lm"
    assert r["metrics"]["perplexity"] == pytest.approx(STORIES_PPL, rel=STORIES_REL_TOL)


@pytest.mark.needs_data
def test_wikitext_perplexity_is_capped_and_finite(data_dir):
    r = mp.evaluate(data_dir / "models/stories260k", data="wikitext2-test", data_dir=data_dir, task_options={"max_eval_tokens": 3000})
    assert r["metrics"]["tokens"] == 2999
    assert 10 < r["metrics"]["perplexity"] < 10_000  # out of domain for a TinyStories model, but finite


def test_agreement_with_itself_is_total(tiny_llama):
    art = mp.load(tiny_llama)
    runner = mp.create_runner(art, "torch")
    a = mp.task_for(art).agreement(runner, runner, TextCorpus("t", ["one two three four five six"]))
    assert a["top1_agreement"] == 1.0
    assert np.isfinite(a["top1_agreement"])
