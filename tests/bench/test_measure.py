import time

import numpy as np
import pytest

import modelpress as mp
from modelpress.bench.measure import BenchConfig, machine_info, percentiles, ratios, speed_record, time_interleaved
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


class _Task:
    """A task with no model behind it: one input row per item."""

    def uses_tokenizer(self):
        return False

    def sample_raw(self, n, _data_dir):
        return list(range(n))

    def preprocess(self, rows, **_):
        return {"x": np.zeros((len(rows), 1), dtype=np.float32)}

    def sample_inputs(self, bs, seq_len=None, data_dir=None):
        return {"x": np.zeros((bs, 1), dtype=np.float32)}


class _Runner:
    """Sleeps ``ms`` per call and logs who ran, so the order and the ratios are known."""

    def __init__(self, name, ms, log):
        self.name, self.ms, self.log = name, ms, log

    def load(self):
        return self

    def run(self, batch):
        self.log.append(self.name)
        time.sleep(self.ms / 1000.0)
        return {}


def test_interleaved_rounds_alternate_the_order_and_report_median_and_spread():
    log = []
    cfg = BenchConfig(batch_sizes=[4], seq_lens=[8], seconds=0.06, rounds=4, latency_calls=8, warmup=1, min_iters=2)
    slow, fast = _Runner("slow", 4, log), _Runner("fast", 1, log)
    base, var = time_interleaved([slow, fast], _Task(), cfg, progress=log.append)  # progress logs "round k of 4"
    rounds = [[]]
    for entry in log[log.index("round 1 of 4") + 1 :]:
        if entry.startswith("round"):
            rounds.append([])
        else:
            rounds[-1].append(entry)
    # each round runs both; the order alternates (ABBA), so a drift in the machine's speed hits both alike
    assert [r[0] for r in rounds] == ["slow", "fast", "slow", "fast"]
    # in a round, one runner's calls, then the other's (each runner's calls contiguous)
    assert all(set(r) == {"slow", "fast"} and r == sorted(r, key=r.index) for r in rounds)
    for t in (base, var):
        (row,) = t["throughput"]
        assert len(row["rounds"]) == 4 and row["spread"][0] <= row["items_per_s"] <= row["spread"][1]
        assert len(t["latency_ms"]["p50_rounds"]) == 4
    rec = speed_record(base, var, runtime="torch", threads=1, rounds=4)
    assert rec["throughput_ratio"] > 1.5 and rec["latency_ratio"] > 1.5  # 4 ms against 1 ms per call
    lo, hi = rec["throughput_ratio_range"]
    assert lo <= rec["throughput_ratio"] <= hi


def test_ratios_of_interleaved_results_are_medians_of_per_round_ratios():
    base = {
        "latency_ms": {"p50": 10, "p90": 20, "p99": 30, "mean": 12, "p50_rounds": [10, 30, 10]},
        "throughput": [{"batch": 1, "seq_len": None, "items_per_s": 100, "rounds": [100, 50, 100]}],
        "memory_mb": {"rise": 0},
        "size_bytes": 0,
    }
    var = {
        "latency_ms": {"p50": 5, "p90": 10, "p99": 10, "mean": 6, "p50_rounds": [5, 10, 5]},
        "throughput": [{"batch": 1, "seq_len": None, "items_per_s": 200, "rounds": [200, 150, 200]}],
        "memory_mb": {"rise": 0},
        "size_bytes": 0,
    }
    r = ratios(var, base)
    # per round: 2x, 3x, 2x -> median 2 (a ratio of medians would say 200/100 = 2 too, but the range shows round 2)
    assert r["throughput_speedup"][0]["speedup"] == 2.0 and r["throughput_speedup"][0]["range"] == [2.0, 3.0]
    assert r["latency_speedup"]["p50"] == 2.0 and r["latency_p50_speedup_range"] == [2.0, 3.0]
    assert r["memory_fraction"] is None and r["size_fraction"] is None


def test_compare_speed_closes_every_runner_when_timing_fails(monkeypatch):
    """The runner leak of tune: a runner was left open when benchmarking raised."""
    import modelpress.runtimes
    import modelpress.tasks
    from modelpress.bench.measure import compare_speed
    from modelpress.errors import ModelpressRuntimeError as RunnerError

    made = []

    class Broken(_Runner):
        closed = False

        def run(self, batch):
            if self.name == "variant":
                raise RunnerError("the variant cannot run")
            return super().run(batch)

        def close(self):
            self.closed = True

    def fake_runner(art, runtime, threads=None):
        made.append(Broken(art, 0, []))
        return made[-1]

    monkeypatch.setattr(modelpress.runtimes, "create_runner", fake_runner)
    monkeypatch.setattr(modelpress.tasks, "task_for", lambda _art: _Task())
    with pytest.raises(RunnerError, match="cannot run"):
        compare_speed("original", "variant", "torch", config=BenchConfig(batch_sizes=[1], seconds=0.01, rounds=1))
    assert [r.name for r in made] == ["original", "variant"] and all(r.closed for r in made)
