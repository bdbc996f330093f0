import pytest

import modelpress as mp
from modelpress.bench.measure import BenchConfig, machine_info, percentiles, ratios
from modelpress.bench.report import bench_table
from modelpress.errors import ConfigError

FAST = BenchConfig(batch_sizes=[1, 4], seq_lens=[8], seconds=0.05, latency_calls=10, warmup=1)


def test_percentiles_exact():
    p = percentiles([i / 1000 for i in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01) and p["calls"] == 100


def test_ratios_are_speedups_and_fractions():
    base = {
        "latency_ms": {"p50": 10, "p90": 20, "p99": 30, "mean": 12},
        "throughput": [{"batch": 1, "seq_len": 8, "items_per_s": 100}],
        "memory_mb": {"rise": 200},
        "size_bytes": 1000,
    }
    fast = {
        "latency_ms": {"p50": 5, "p90": 10, "p99": 10, "mean": 6},
        "throughput": [{"batch": 1, "seq_len": 8, "items_per_s": 300}],
        "memory_mb": {"rise": 100},
        "size_bytes": 250,
    }
    r = ratios(fast, base)
    assert r["latency_speedup"]["p50"] == 2 and r["latency_speedup"]["p99"] == 3
    assert r["throughput_speedup"][0]["speedup"] == 3
    assert r["memory_fraction"] == 0.5 and r["size_fraction"] == 0.25


def test_bench_two_runtimes_with_baseline(tiny_encoder):
    report = mp.bench(tiny_encoder, runtimes=["torch", "onnxruntime"], baseline="torch", config=FAST, threads=1)
    assert [r["runtime"] for r in report["results"]] == ["torch", "onnxruntime"]
    assert report["baseline_index"] == 0 and set(report["ratios"]) == {"1"}
    r = report["results"][1]
    assert {t["batch"] for t in r["throughput"]} == {1, 4} and all(t["items_per_s"] > 0 for t in r["throughput"])
    assert r["latency_ms"]["p50"] > 0 and r["size_bytes"] > 0 and r["threads"] == 1
    assert report["machine"]["cores"] >= 1
    table = bench_table(report)
    assert len(table.columns) == 3 and table.row_count == 3 + 2 + 2


def test_bench_image_model_has_no_seq_lens(tiny_cnn):
    art = mp.load(tiny_cnn, task="image-classification")
    report = mp.bench(art, runtimes=["torch"], config=FAST)
    assert [t["seq_len"] for t in report["results"][0]["throughput"]] == [None, None]
    assert report["baseline_index"] is None


def test_bad_config_and_baseline():
    with pytest.raises(ConfigError, match="batch_sizes"):
        BenchConfig(batch_sizes=[0])
    with pytest.raises(ConfigError, match="seconds"):
        BenchConfig(seconds=0)
    with pytest.raises(ConfigError, match="Unknown runtime 'tpu'"):
        mp.bench("minilm", baseline="minilm@tpu")


def test_machine_info_has_cpu_and_flags():
    info = machine_info()
    assert "cpu" in info and isinstance(info["flags"], list)
