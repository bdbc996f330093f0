"""The one step pipeline: one manifest record for every verb, old manifests still read, lineage.

The fixtures in ``data/`` are manifests written by the code before the step pipeline (commit
7cae499): a ``modelpress prune`` variant (with its older speed record) and a recipe step (no
speed at all). They were produced by that code on the tiny Llama and trimmed by hand (two entries
of ``layer_sparsity`` kept).
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from modelpress.artifacts import Artifact
from modelpress.bench.measure import BenchConfig
from modelpress.optimize.api import prune_model
from modelpress.optimize.recipe import run_step
from modelpress.optimize.step import RECORD_KEYS, Speed, read_record

DATA = Path(__file__).parent / "data"
OLD_PRUNE = DATA / "manifest-7cae499-prune.json"
OLD_RECIPE_STEP = DATA / "manifest-7cae499-recipe-step.json"
FAST = BenchConfig(batch_sizes=[2], seq_lens=[16], seconds=0.05, rounds=2, latency_calls=6, warmup=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from modelpress.tasks.text import real_sentences

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(real_sentences(64, None)) + "\n")
    return path


def _as_artifact_folder(manifest: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(manifest, folder / "modelpress.json")
    return folder


@pytest.mark.parametrize("fixture", [OLD_PRUNE, OLD_RECIPE_STEP], ids=["prune", "recipe-step"])
def test_manifests_written_before_the_step_pipeline_still_load(fixture, tmp_path):
    art = Artifact.open(_as_artifact_folder(fixture, tmp_path / "old"))
    old = json.loads(fixture.read_text())
    assert art.manifest.step == old["step"] and art.manifest.parent == old["parent"]
    assert art.manifest.metrics == old["metrics"]  # nothing dropped or rewritten on load
    rec = read_record(art)
    assert rec["shippable"] is True and rec["gate"]["passed"] is True
    assert rec["evaluation"]["dataset"] == "corpus" and rec["evaluation"]["perplexity"] > 0
    assert rec["technique"]["sparsity"] == old["metrics"]["technique"]["sparsity"]
    if fixture is OLD_PRUNE:  # the older speed record gains today's per-figure rows
        (row,) = rec["speed"]["throughput"]
        assert row["speedup"] == old["metrics"]["speed"]["throughput_ratio"] and row["batch"] == 8
        assert rec["speed"]["latency_ratio"] == old["metrics"]["speed"]["latency_ratio"]
    else:
        assert rec["speed"] is None


def test_the_step_record_keeps_every_field_the_old_manifests_had(tiny_llama, corpus, tmp_path):
    res = prune_model(
        str(tiny_llama), tmp_path / "p", {"technique": "magnitude-prune", "nm": "2:4"}, data=str(corpus), threads=1, seconds=0.1
    )
    new = json.loads((tmp_path / "p/modelpress.json").read_text())
    old = json.loads(OLD_PRUNE.read_text())
    assert set(old) <= set(new)
    assert set(old["metrics"]) <= set(new["metrics"]) and set(RECORD_KEYS) <= set(new["metrics"])
    for key in ("evaluation", "gate", "speed"):
        assert set(old["metrics"][key]) <= set(new["metrics"][key]), key
    assert set(old["metrics"]["gate"]["rows"][0]) <= set(new["metrics"]["gate"]["rows"][0])
    speed = new["metrics"]["speed"]
    assert speed == res["speed"] and speed["rounds"] == 5 and speed["runtime"] == "torch"
    row = speed["throughput"][0]
    assert row["batch"] == speed["batch_size"] == 8 and row["speedup"] == speed["throughput_ratio"]
    lo, hi = speed["throughput_ratio_range"]
    assert lo <= speed["throughput_ratio"] <= hi  # the median of the per-round ratios lies within their spread
    assert read_record(Artifact.open(tmp_path / "p"))["speed"] == speed
    # a recipe step records the same keys (speed None when not measured)
    old_step = json.loads(OLD_RECIPE_STEP.read_text())
    from modelpress.optimize.recipe import run_recipe

    r = run_recipe(
        str(tiny_llama),
        {"gate": {"perplexity": {"min_recovery": 0.5}}, "steps": [{"technique": "magnitude-prune", "sparsity": 0.25}]},
        tmp_path / "r",
        data=str(corpus),
        threads=1,
    )
    step = json.loads((Path(r.steps[0].path) / "modelpress.json").read_text())
    assert set(old_step["metrics"]) <= set(step["metrics"]) and step["metrics"]["speed"] is None
    assert set(old_step["metrics"]["evaluation"]) == set(step["metrics"]["evaluation"])


def test_a_one_step_recipe_times_registers_and_records_lineage(tiny_llama, corpus, tmp_path):
    from modelpress.registry.api import Registry

    with Registry(home=tmp_path / "home") as reg:
        res = run_step(
            str(tiny_llama),
            {"technique": "magnitude-prune", "sparsity": 0.25},
            tmp_path / "v",
            data=str(corpus),
            threads=1,
            gate=None,
            max_drop=0.5,
            speed=Speed(FAST),
            register=True,
            registry=reg,
            name="tiny",
        )
        (step,) = res.steps
        assert step.shipped and step.registered == "tiny:2" and res.registered_original == "tiny:1"
        assert Path(step.path) == (tmp_path / "v").resolve()
        assert step.speed["rounds"] == 2 and step.speed["throughput"][0]["batch"] == 2
        child = reg.lineage("tiny:1")["root"]["children"][0]
        assert child["ref"] == "tiny:2" and child["step"] == "magnitude-prune"
        assert child["metrics"]["speedup"] == pytest.approx(step.speed["throughput_ratio"])
        assert child["metrics"]["perplexity"] == pytest.approx(step.evaluation["metrics"]["perplexity"])
    # a gate that cannot pass: the variant stays at the output, marked, and is not registered
    res = run_step(
        str(tiny_llama),
        {"technique": "magnitude-prune", "sparsity": 0.25},
        tmp_path / "bad",
        data=str(corpus),
        threads=1,
        gate={"thresholds": [{"metric": "top1_agreement", "min_value": 1.01}]},
    )
    (step,) = res.steps
    assert not step.shipped and step.registered is None and Path(step.path) == (tmp_path / "bad").resolve()
    assert json.loads((tmp_path / "bad/modelpress.json").read_text())["metrics"]["shippable"] is False


def test_a_recipe_step_that_breaks_the_gate_retries_with_its_most_sensitive_layers_in_float(tiny_encoder, tmp_path):
    from modelpress.optimize.recipe import run_recipe

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("sentence1,sentence2,score\n" + "\n".join(f"a cat number {i},a dog number {i},{i % 5}" for i in range(20)) + "\n")
    recipe = {"gate": {"mean_cosine": {"min_value": 1.01}}, "steps": [{"technique": "dynamic-int8", "auto_exclude": 2}]}
    res = run_recipe(str(tiny_encoder), recipe, tmp_path / "out", data=str(pairs), task="embedding", threads=1)
    (step,) = res.steps
    assert step.error is None and not step.shipped and len(step.excluded) == 2  # 1, then 2 layers kept in float; still failing
    manifest = json.loads((Path(step.path) / "modelpress.json").read_text())
    assert Path(step.path).parent.name == "rejected" and manifest["metrics"]["shippable"] is False
    assert manifest["step"]["exclude"] == [f"^{re.escape(name)}$" for name in step.excluded]  # the variant on disk is the last retry
