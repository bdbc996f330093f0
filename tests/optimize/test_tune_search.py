"""The tuner's staged search: every candidate built and timed, the fastest screened and scored, the pick re-timed.

On the tiny random encoder (2 layers, hidden 32) and STS-B pairs, gated on agreement with the
original (its Spearman means nothing): the test-only weight-noise technique gives variants whose
verdicts are known in advance (sigma 0 keeps the outputs exactly, sigma 3 destroys them). The
first timing of a candidate is what the search orders by; here it is injected (the real timing
is run, then its speed-up replaced), so the order the search sees is known; and a genuinely slow
runtime (PyTorch with a sleep in every call) shows that the pick comes from the final re-timing,
not from that first figure.
"""

from __future__ import annotations

import io
import json
import tempfile
import time

import pytest

from modelpress.optimize.configs import parse_step
from modelpress.optimize.gate import GateConfig
from modelpress.optimize.search import tune as tune_mod
from modelpress.optimize.search.stages import screen_margin, screen_size, screening_gate, subsample
from modelpress.optimize.search.tune import SPEED_TIE, STOP_BUDGET, STOP_SCREEN, STOP_SLOWER, Candidate, tune
from modelpress.optimize.step import Pipeline
from modelpress.runtimes.base import RUNTIMES
from modelpress.runtimes.torch import TorchRunner

from .test_recipe import WeightNoise  # noqa: F401  (registers the test technique)

ROWS = 300  # STS-B dev pairs scored in full
NOISY, CLEAN, NEAR = "test-weight-noise@torch(sigma=3.0)", "test-weight-noise@torch", "test-weight-noise@torch(sigma=0.001)"
SCREEN_ROWS = 60  # the screening subsample
BROKEN, CLEAN, SLOW = "test-weight-noise@torch(sigma=3.0)", "test-weight-noise@torch", "fp32@test-slow"
GATE = GateConfig(thresholds=[{"metric": "mean_cosine", "min_value": 0.99}])
FAST = {"task": "embedding", "data": "stsb-dev", "limit": ROWS, "threads": 1, "batch_size": 4, "seq_len": 16, "bench_seconds": 0.1}
SLEEP_S = 0.02  # per call of the slow runtime: several times a tiny encoder's own call


def noise(sigma: float) -> dict:
    return {"technique": "test-weight-noise", "sigma": sigma}


def inject_first_speedups(monkeypatch, by_label: dict[str, float]) -> None:
    """Run each candidate's real first timing, then report the given speed-up for it instead."""
    real = tune_mod._first_timing

    def fake(pipe, art, runtime):
        rec = real(pipe, art, runtime)
        label = f"fp32@{runtime}" if art is pipe.original else parse_step(art.manifest.step).label()
        if label in by_label:
            rec["throughput_ratio"] = by_label[label]
            rec["variant_items_per_s"] = rec["original_items_per_s"] * by_label[label]
        return rec

    monkeypatch.setattr(tune_mod, "_first_timing", fake)


def count_full_scores(monkeypatch) -> list[str]:
    """The runtimes/models fully scored (Pipeline.judge), in order."""
    calls: list[str] = []
    real = Pipeline.judge

    def judge(self, art, runtime):
        calls.append(f"{art.manifest.step or 'original'}@{runtime}")
        return real(self, art, runtime)

    monkeypatch.setattr(Pipeline, "judge", judge)
    return calls


class SlowTorchRunner(TorchRunner):
    """PyTorch eager with a sleep in every call: a runtime that is really slower."""

    name = "test-slow"

    def _run(self, batch):
        time.sleep(SLEEP_S)
        return super()._run(batch)


def test_screening_subsample_and_margin():
    from modelpress.datasets import PairDataset

    assert screen_size(1500) == 200 and screen_size(5000) == 500  # a tenth, at least 200 rows
    assert screen_size(300) == 0 and screen_size(300, 60) == 60 and screen_size(300, 0) == 0  # too small to save anything; forced
    assert screen_margin(200) == pytest.approx(0.5 / 200**0.5) and screen_margin(10**6) == 0.01
    ds = PairDataset("d", [f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)], [float(i) for i in range(10)])
    sub = subsample(ds, 4)
    assert sub.sentences1 == ["a0", "a3", "a6", "a9"] and sub.scores == [0.0, 3.0, 6.0, 9.0]  # spread over the split
    assert subsample(ds, 4) == sub  # the same rows every time
    loose = screening_gate(GateConfig.for_task("embedding", max_drop=0.01, min_agreement=0.95), {"spearman": 0.8}, 0.03)
    assert [(t.min_recovery, t.min_value) for t in loose.thresholds] == [(pytest.approx(0.96), None), (None, pytest.approx(0.92))]


@pytest.mark.needs_data
def test_stages_slower_and_screened_out_candidates_are_never_fully_scored(tiny_encoder, tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))  # a cache of its own
    monkeypatch.setitem(RUNTIMES, "test-slow", SlowTorchRunner)
    # the order the search sees: the destroyed variant looks fastest, the faithful one next, the slow runtime last
    inject_first_speedups(monkeypatch, {BROKEN: 3.0, CLEAN: 2.0, SLOW: 1.5})
    judged = count_full_scores(monkeypatch)
    cands = ["torch", noise(3.0), noise(0.0), Candidate("test-slow")]
    res = tune(str(tiny_encoder), candidates=cands, gate=GATE, screen_rows=SCREEN_ROWS, budget_s=600, output=tmp_path / "out", **FAST)
    by = {p.label: p for p in res.points}
    broken, clean, slow = by[BROKEN], by[CLEAN], by[SLOW]
    # every candidate was built and timed; the broken one failed screening and was never scored in full
    assert all(p.first_speedup is not None and p.latency_p50_ms for p in res.points)
    assert (broken.stage, broken.stop, broken.status) == ("screened", STOP_SCREEN, "timed")
    assert broken.screen["rows"] == SCREEN_ROWS and not broken.screen["passed"] and broken.gate is None and broken.quality == {}
    assert broken.screen["quality"]["mean_cosine"] < 0.99 - screen_margin(SCREEN_ROWS)
    # the faithful one passed screening and the full gate; the slow one, timed side by side with it
    # before being dropped, was slower: never screened, never scored
    assert (clean.stage, clean.stop, clean.passed, clean.screen["passed"]) == ("scored", None, True, True)
    assert (slow.stage, slow.stop, slow.screen, slow.gate) == ("timed", STOP_SLOWER, None, None)
    assert clean.label in slow.reason and "side by side" in slow.reason
    (confirmation,) = res.search["confirmations"]
    assert confirmation["best"] == CLEAN and confirmation[SLOW] < confirmation[CLEAN] * (1 - SPEED_TIE)
    assert len(judged) == 1 and "'sigma': 0.0" in judged[0]  # one full evaluation in all (the baseline's is the original's)
    assert by["fp32@torch"].stage == "scored" and by["fp32@torch"].passed
    assert res.search["stages"] == {"built": 4, "timed": 4, "screened": 3, "scored": 2}  # reached at least (the baseline: scored)
    # the report and the JSON show each candidate's stage and why it stopped
    page = (tmp_path / "out/report.html").read_text()
    assert "stage reached" in page and STOP_SCREEN in page and STOP_SLOWER in page and "id='stages'" in page
    points = {p["label"]: p for p in json.loads((tmp_path / "out/tune.json").read_text())["points"]}
    assert points[BROKEN]["stop"] == STOP_SCREEN and points[SLOW]["stage"] == "timed"

    # again: every stage comes from the cache; the screening and gate verdicts are kept, nothing is scored again
    judged.clear()
    again = tune(str(tiny_encoder), candidates=cands, gate=GATE, screen_rows=SCREEN_ROWS, budget_s=600, report=False, **FAST)
    assert all(p.cached for p in again.points) and judged == []
    assert {p.label: (p.stage, p.stop) for p in again.points} == {p.label: (p.stage, p.stop) for p in res.points}


@pytest.mark.needs_data
def test_the_pick_comes_from_timing_candidates_together_not_from_their_first_timings(tiny_encoder, monkeypatch, data_dir):
    monkeypatch.setitem(RUNTIMES, "test-slow", SlowTorchRunner)
    # first timings that mislead: the slow runtime looks fastest (a quiet moment, say), the faithful copy next
    inject_first_speedups(monkeypatch, {SLOW: 3.0, CLEAN: 2.0})
    judged = count_full_scores(monkeypatch)
    cands = [Candidate("torch"), Candidate("test-slow"), noise(0.0)]
    res = tune(str(tiny_encoder), candidates=cands, gate=GATE, budget_s=600, use_cache=False, **FAST)
    by = {p.label: p for p in res.points}
    slow, clean = by[SLOW], by[CLEAN]
    assert slow.passed and slow.first_speedup == pytest.approx(3.0)  # it passes the gate and looked fastest ...
    # ... so the copy, at 2x, would have been dropped as slower; timed side by side with it first, it is not
    (confirmation,) = res.search["confirmations"]
    assert confirmation["best"] == SLOW and confirmation[CLEAN] > confirmation[SLOW]
    assert clean.stage == "scored" and clean.passed and len(judged) == 2
    # the final re-timing of every passing candidate together shows the slow one for what it is
    assert slow.retimed and slow.speedup < 0.7 and clean.retimed
    assert res.chosen in (by["fp32@torch"], clean) and res.chosen.retimed
    assert set(res.search["retimed"]) == {"fp32@torch", SLOW, CLEAN}


@pytest.mark.needs_data
def test_a_spent_budget_leaves_every_candidate_timed_with_a_clear_reason(tiny_encoder, tmp_path, data_dir):
    """Timing alone spends the budget: every candidate is still timed, and the fastest survivors are still scored
    until one other than the baseline passes (else the pick would always be the unoptimized model)."""
    from rich.console import Console

    from modelpress.cli.optimize import tune_table

    cands = ["torch", noise(0.0), noise(3.0)]
    out = tmp_path / "o"
    res = tune(str(tiny_encoder), candidates=cands, gate=GATE, budget_s=1e-3, exhaustive=True, use_cache=False, output=out, **FAST)
    others = [p for p in res.points if p.label != "fp32@torch"]
    assert all(p.stage in ("timed", "screened", "scored") for p in others)
    clean = next(p for p in others if p.label == CLEAN)
    # the clean copy passes when scored; it is scored unless the noisy one passed first (then it stops for the budget)
    passed = [p for p in others if p.passed]
    assert passed and all(p.stage == "scored" for p in passed)
    unscored = [p for p in others if p.stage != "scored"]
    assert all(p.stop == STOP_BUDGET and "budget" in p.reason for p in unscored)
    assert clean.passed or clean.stop == STOP_BUDGET
    assert res.chosen.label in {"fp32@torch", *(p.label for p in passed)}
    assert res.notes and "more than the budget" in res.notes[0]
    buf = io.StringIO()
    Console(file=buf, width=400).print(tune_table(res))
    table = buf.getvalue()
    assert "more than the budget" in table and "stage" in table
    assert all(any(p.label in line and STOP_BUDGET in line for line in table.splitlines()) for p in unscored)
    assert (out / "report.html").is_file()


@pytest.mark.needs_data
def test_the_report_in_headless_chromium_shows_the_plots_the_stages_and_the_pick(tiny_encoder, tmp_path, data_dir):
    from html.parser import HTMLParser

    from .._processes import run_group
    from ..serving.test_dashboard import CHROMIUM_FLAGS, CHROMIUM_TIMEOUT_S, _find_or_install_chromium

    chromium, why = _find_or_install_chromium()
    if chromium is None:
        pytest.skip(why)
    out = tmp_path / "o"
    # a compound candidate whose training (10 minutes) the 600 s budget does not cover: in the report, not built
    compound = {"steps": [{"technique": "distill", "layers": 1, "training": {"max_seconds": 600}}, {"technique": "dynamic-int8"}]}
    cands = ["torch", noise(0.0), noise(3.0), compound]
    res = tune(str(tiny_encoder), candidates=cands, gate=GATE, budget_s=600, use_cache=False, output=out, **FAST)
    # a copy of the report with a probe: once the page has loaded, how many of its images decoded (and how big they are)
    probe = (
        "<script>window.addEventListener('load', () => document.body.setAttribute('data-plots', "
        "[...document.images].filter(i => i.complete && i.naturalWidth > 200).map(i => i.alt).join(',')));</script></body>"
    )
    page = out / "probe.html"
    assert res.report == str(out / "report.html")
    page.write_text((out / "report.html").read_text().replace("</body>", probe))
    with tempfile.TemporaryDirectory(prefix="mp-chromium-") as profile:
        done = run_group(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=2000", "--dump-dom", page.as_uri()],
            capture_output=True,
            text=True,
            timeout=CHROMIUM_TIMEOUT_S,
        )
    assert done.returncode == 0, done.stderr[-2000:]

    class Cells(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.body: dict[str, str] = {}
            self.text: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "body":
                self.body = {k: v or "" for k, v in attrs}

        def handle_data(self, data):
            self.text.append(data)

    dom = Cells()
    dom.feed(done.stdout)
    assert dom.body.get("data-plots", "").split(",") == ["pareto", "latency"]  # both plots decoded and drawn
    text = " ".join(dom.text)
    assert f"Chosen: {res.chosen.label}" in text and "stage reached" in text and "picked" in text
    assert all(p.label in text for p in res.points) and "scored" in text
    assert "Compound candidates" in text and "needs --budget >= 13m" in text  # the compound stage: not built, and why
