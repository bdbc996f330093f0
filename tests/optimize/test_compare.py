"""Model selection (``modelpress compare``, ``mp.compare``) on real models of one task.

MiniLM and two structured-FFN-pruned variants of it (made with ``apply_technique``, no recovery
training, so they really lose quality) on the first STS-B dev pairs; stories260k and two variants
of it (pruned, layer-distilled) on TinyStories through the CLI. Timings are short (``seconds``,
``rounds``) so that the file adds well under a minute on an idle 2-core machine; no assertion
rests on one model being faster than another (a loaded machine may reorder close ones), only on
what the measurement and the recommendation must do with the figures measured.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

import modelpress as mp
from modelpress.errors import ConfigError, ModelNotFoundError, TaskMismatchError
from modelpress.optimize.search.compare import COST_TIE, Entry, Goal, compare, cost_per_million, instances, recommend

pytestmark = pytest.mark.needs_data

STSB_PAIRS = 100  # the first STS-B dev pairs: 200 sentences per model
# A short timing: figures are real, not precise. One thread: on a loaded 2-core machine two torch threads
# spend most of their time spinning at OpenMP barriers (stories260k's compare took 44 s with two, 10 s with one).
FAST = {"seconds": 0.3, "rounds": 2, "batch_size": 8, "seq_len": 32, "threads": 1}
PRICE = "aws-c6a.large"  # a 2-vCPU preset: the tests check the arithmetic and the source, not the fit


@pytest.fixture(scope="session")
def minilm_trio(tmp_path_factory):
    """MiniLM and its FFN pruned to half and to a quarter (no recovery training), as folders."""
    root = tmp_path_factory.mktemp("compare-models")
    paths = []
    for ratio in (0.5, 0.75):
        art = mp.apply_technique("minilm", {"technique": "structured-prune", "ratio": ratio}, root / f"minilm-ffn{int(ratio * 100)}")
        paths.append(str(art.path))
    return ["minilm", *paths]


@pytest.fixture(scope="session")
def minilm_compared(minilm_trio, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-out")
    return compare(minilm_trio, data="stsb-dev", limit=STSB_PAIRS, data_dir=data_dir, instance=PRICE, output=out, **FAST)


@pytest.fixture(scope="session")
def stories_variants(data_dir, tmp_path_factory):
    path = data_dir / "models/stories260k"
    if not (path / "config.json").is_file():
        pytest.skip(f"stories260k is absent from the shared data folder ({path})")
    root = tmp_path_factory.mktemp("compare-lm")
    pruned = mp.apply_technique(str(path), {"technique": "structured-prune", "ratio": 0.5}, root / "stories-ffn50")
    distilled = mp.apply_technique(
        str(path), {"technique": "distill", "layers": 3, "training": {"max_steps": 10, "eval_every": None}}, root / "stories-3layers"
    )
    return [str(path), str(pruned.path), str(distilled.path)]


def test_three_minilm_models_measured_side_by_side_with_cost_and_front(minilm_compared, minilm_trio):
    res = minilm_compared
    assert [e.label for e in res.entries] == minilm_trio and res.task == "embedding" and res.metric == "spearman"
    original, half, quarter = res.entries
    # real quality on STS-B: MiniLM scores about 0.8-0.95 on the first pairs; pruning without recovery loses some
    assert 0.75 < original.quality < 0.99
    assert half.quality < original.quality and quarter.quality < original.quality
    assert quarter.size_bytes < half.size_bytes < original.size_bytes  # fewer FFN weights on disk
    price = instances()[PRICE]["usd_per_hour"]
    assert res.price.usd_per_hour == price and res.price.source.startswith("https://") and res.price.as_of
    for e in res.entries:
        assert e.p50_ms > 0 and e.p99_ms >= e.p50_ms and e.throughput > 0 and e.memory_mb is not None
        assert e.cost_per_million == pytest.approx(price / (e.throughput * 3600) * 1e6)
        lo, hi = e.throughput_spread
        assert lo <= e.throughput <= hi
        lo, hi = e.speedup_range  # against the first model, round by round
        assert lo <= e.speedup <= hi
    assert original.speedup == 1.0 and original.speedup_range == [1.0, 1.0]
    # the front: no model on it is beaten on both quality and throughput by another
    assert res.front and all(
        not (o.quality >= e.quality and o.throughput >= e.throughput and o is not e) for e in res.front for o in res.entries
    )
    assert original in res.front  # the best quality is never dominated
    # no goal: the cheapest (highest throughput, near ties to the better quality) is recommended
    best = res.recommended
    top = max(e.throughput for e in res.entries)
    assert best.throughput >= top * (1 - COST_TIE) and best.verdict.startswith("recommended")
    assert all(e.verdict.startswith("meets the goal") for e in res.entries if e is not best)
    assert res.answer == f"Recommended: {best.label} (no bound: the cheapest)."
    saved = json.loads(Path(res.report).with_name("compare.json").read_text())
    assert saved["recommended"] == best.label and [x["label"] for x in saved["entries"]] == minilm_trio


def test_the_goal_decides_with_the_reason_each_other_model_was_not_chosen(minilm_compared):
    res = copy.deepcopy(minilm_compared)  # recommend() rewrites the verdicts: the report test reads the measured result's
    original = res.entries[0]
    # only the original keeps its own quality: it is recommended, and the pruned ones say what they miss
    pick = recommend(res.entries, Goal(min_quality=original.quality), res.metric, True)
    assert pick is original
    for e in res.entries[1:]:
        assert not e.meets and e.verdict == f"misses the goal: spearman {e.quality:.4g} < {original.quality:g}"
    # a cost bound below the cheapest: none meets, each says by how much
    cheapest = min(e.cost_per_million for e in res.entries)
    assert recommend(res.entries, Goal(max_cost_per_million=cheapest / 2), res.metric, True) is None
    assert all("per million >" in e.verdict for e in res.entries)
    # a latency bound every model meets and a quality bound one pruned model misses
    worst = min(res.entries, key=lambda e: e.quality)
    goal = Goal(max_p99_ms=max(e.p99_ms for e in res.entries) * 2, min_quality=worst.quality + 1e-9)
    pick = recommend(res.entries, goal, res.metric, True)
    assert pick is not None and pick is not worst and "misses the goal: spearman" in worst.verdict
    loser = next(e for e in res.entries if e is not pick and e is not worst)
    assert loser.verdict.startswith("meets the goal")


def test_recommendation_rules_on_given_figures():
    """Lower-is-better metrics, near ties on cost (to the better quality), and every miss listed."""

    def entry(label, q, thr, p99):
        return Entry(label, label, label, "torch", quality=q, throughput=thr, p99_ms=p99, cost_per_million=cost_per_million(0.1, thr))

    a, b, c = entry("a", 2.0, 100.0, 5.0), entry("b", 1.9, 100.0 * (1 - COST_TIE / 2), 5.0), entry("c", 1.5, 10.0, 50.0)
    assert recommend([a, b, c], Goal(), "bits_per_byte", False) is b  # a near tie on cost: the lower bits per byte wins
    assert "as cheap as b" in a.verdict and c.verdict.startswith("meets the goal but costs")
    assert recommend([a, b, c], Goal(max_p99_ms=10, min_quality=1.95), "bits_per_byte", False) is b
    assert a.verdict == "misses the goal: bits_per_byte 2 > 1.95" and c.verdict == "misses the goal: p99 50.00 ms > 10 ms"
    assert recommend([a, c], Goal(max_p99_ms=10, min_quality=1.95), "bits_per_byte", False) is None
    assert math.isclose(cost_per_million(0.36, 100.0), 1.0)  # $0.36/h at 100 items/s: 360,000 items per hour


def test_the_report_in_headless_chromium_shows_the_plot_and_the_recommendation(minilm_compared, tmp_path):
    from .._processes import run_group
    from ..serving.test_dashboard import CHROMIUM_FLAGS, CHROMIUM_TIMEOUT_S, _find_or_install_chromium

    chromium, why = _find_or_install_chromium()
    if chromium is None:
        pytest.skip(why)
    res = minilm_compared
    probe = (
        "<script>window.addEventListener('load', () => document.body.setAttribute('data-plots', "
        "[...document.images].filter(i => i.complete && i.naturalWidth > 200).map(i => i.alt).join(',')));</script></body>"
    )
    page = tmp_path / "probe.html"
    page.write_text(Path(res.report).read_text().replace("</body>", probe))
    with tempfile.TemporaryDirectory(prefix="mp-chromium-") as profile:
        done = run_group(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=2000", "--dump-dom", page.as_uri()],
            capture_output=True,
            text=True,
            timeout=CHROMIUM_TIMEOUT_S,
        )
    assert done.returncode == 0, done.stderr[-2000:]

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.body: dict[str, str] = {}
            self.ids: dict[str, list[str]] = {}
            self._in: str | None = None
            self._tag = ""

        def handle_starttag(self, tag, attrs):
            a = {k: v or "" for k, v in attrs}
            if tag == "body":
                self.body = a
            if a.get("id"):
                self._in, self._tag = a["id"], tag
                self.ids[self._in] = []
            elif self._in and tag == "td":
                self.ids[self._in].append("|")  # cells apart

        def handle_endtag(self, tag):
            if tag == self._tag:
                self._in = None

        def handle_data(self, data):
            if self._in:
                self.ids[self._in].append(data)

    dom = Page()
    dom.feed(done.stdout)
    assert dom.body.get("data-plots", "").split(",") == ["quality-cost", "latency"]  # both plots decoded and drawn
    assert "".join(dom.ids["recommendation"]).strip() == res.answer
    assert PRICE in "".join(dom.ids["price"])
    table = "".join(dom.ids["models"])
    missing = [(e.label, e.verdict) for e in res.entries if e.label not in table or e.verdict not in table]
    assert not missing, table


def test_cli_on_causal_lm_models_json_and_none_meets(stories_variants, data_dir, tmp_path):
    from typer.testing import CliRunner

    from modelpress.cli.main import app

    args = ["compare", *stories_variants, "--data", "tinystories", "--data-dir", str(data_dir), "-o", str(tmp_path / "c")]
    args += ["--seconds", "0.3", "--rounds", "2", "--batch-size", "4", "--seq-len", "32", "--threads", "1", "--price-per-hour", "0.1"]
    res = CliRunner().invoke(app, [*args, "--max-p99-ms", "0.001", "--json"])
    assert res.exit_code == 4, res.output
    data = json.loads(res.stdout)
    assert data["recommended"] is None and data["answer"].startswith("None meets the goal (p99 <= 0.001 ms")
    assert data["metric"] == "bits_per_byte" and not data["higher_is_better"]
    assert [e["label"] for e in data["entries"]] == stories_variants
    original = data["entries"][0]
    # stories260k's own perplexity on its TinyStories sample is about 3.55 per token (../shared/data/README.md)
    assert original["metrics"]["perplexity"] == pytest.approx(3.55, abs=0.05)
    assert 0 < original["quality"] < 2  # bits per byte of English text for a model that knows the domain
    for e in data["entries"]:
        assert e["verdict"].startswith("misses the goal: p99 ") and e["cost_per_million"] > 0
    assert (tmp_path / "c" / "report.html").is_file() and (tmp_path / "c" / "quality-cost.png").stat().st_size > 1000


def test_bad_input_gets_a_clear_error(minilm_trio, data_dir):
    from typer.testing import CliRunner

    from modelpress.cli.main import app

    with pytest.raises(ModelNotFoundError):
        compare(["minilm", "no-such-model-xyz"], data_dir=data_dir)
    stories = str(data_dir / "models/stories260k")
    with pytest.raises(TaskMismatchError, match=r"minilm is embedding, .* is causal-lm"):
        compare(["minilm", stories], data_dir=data_dir)
    with pytest.raises(ConfigError, match="at least two models"):
        compare(["minilm"])
    with pytest.raises(ConfigError, match="named twice"):
        compare(["minilm", "minilm"])
    with pytest.raises(ConfigError, match="needs a price"):
        compare(minilm_trio[:2], max_cost_per_million=1.0)
    with pytest.raises(ConfigError, match="Unknown instance 'aws-nope'") as err:
        compare(minilm_trio[:2], instance="aws-nope")
    assert "aws-c7i.large" in err.value.hint
    with pytest.raises(ConfigError, match="positive number of USD"):
        compare(minilm_trio[:2], price_per_hour=-1)
    with pytest.raises(ConfigError, match="--max-p99-ms must be a positive number"):
        compare(minilm_trio[:2], max_p99_ms=0)
    with pytest.raises(ConfigError, match="rounds must be at least 1"):  # before any model is evaluated
        compare(minilm_trio[:2], rounds=0)
    res = CliRunner().invoke(app, ["compare", "minilm", stories, "--data-dir", str(data_dir)])
    assert res.exit_code != 0 and "different tasks" in res.output and "hint:" in res.output
    res = CliRunner().invoke(app, ["compare", "minilm", "no-such-model-xyz"])
    assert res.exit_code != 0 and "no-such-model-xyz" in res.output


def test_instance_presets_have_a_price_a_source_and_a_date():
    from typer.testing import CliRunner

    from modelpress.cli.main import app

    table = instances()
    assert len(table) >= 4
    for name, e in table.items():
        assert e["usd_per_hour"] > 0 and e["source"].startswith("https://") and e["as_of"], name
    res = CliRunner().invoke(app, ["instances", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == table
    assert mp.compare is compare


def test_tune_compares_each_models_chosen_variant(stories_variants, data_dir, tmp_path):
    """``tune=True``: the tuner runs on each model first (here on the torch baseline only, to stay short)
    and the compare measures what it chose, labelled with the variant."""
    models = stories_variants[:2]
    res = compare(
        models,
        data="tinystories",
        data_dir=data_dir,
        tune=True,
        tune_budget_s=60,
        max_drop=0.05,
        tune_options={"candidates": ["torch"], "use_cache": False},
        output=tmp_path / "c",
        **{**FAST, "batch_size": 4},
    )
    assert [e.tuned_from for e in res.entries] == models
    assert all(e.variant == "fp32@torch" and e.label == f"{m} (fp32@torch)" for e, m in zip(res.entries, models, strict=True))
    tuned = list((tmp_path / "c" / "tuned").iterdir())  # each tune's own output: its table, report and chosen variant
    assert len(tuned) == 2 and all((d / "tune.json").is_file() for d in tuned) and res.recommended is not None
