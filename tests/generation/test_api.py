"""``mp.evaluate`` and ``mp.bench`` reach causal LMs' generation through the same engines."""

from __future__ import annotations

import pytest

import modelpress as mp
from modelpress.bench.measure import BenchConfig
from modelpress.errors import ConfigError


def test_evaluate_keeps_perplexity_and_adds_generation(stories260k, data_dir):
    r = mp.evaluate(stories260k, data="tinystories", data_dir=data_dir, limit=4, engine="torch")
    assert r["metrics"]["perplexity"] > 1
    gen = r["generation"]
    assert gen["prompts"] == 4 and gen["engine"] == "torch"
    assert gen["greedy_identical"] == 1.0  # the torch engine is the reference: batching must not change it
    assert gen["decode_tokens_per_s"] > 0


def test_bench_measures_decode_speed(stories260k):
    cfg = BenchConfig(batch_sizes=[1], seq_lens=[16], seconds=0.1, rounds=1, min_iters=1)
    report = mp.bench(stories260k, config=cfg, engines=["torch"])
    (row,) = report["generation"]
    assert row["engine"] == "torch" and row["decode_tokens_per_s"] > 0 and row["new_tokens"] == 32
    assert report["results"]  # the runner figures are still there


def test_engines_need_a_causal_lm(tiny_classifier):
    with pytest.raises(ConfigError, match="causal-lm"):
        mp.bench(tiny_classifier, config=BenchConfig(batch_sizes=[1], seq_lens=[16], seconds=0.1, rounds=1), engines=["torch"])
