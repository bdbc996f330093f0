"""Recipes: parsing (typos fail with the valid keys), running, gating, rejecting.

The gate mechanics are checked on the real all-MiniLM-L6-v2 and real STS-B pairs with a test-only
technique that adds Gaussian noise to the encoder weights: no noise keeps the quality exactly,
heavy noise destroys it, so the expected verdicts are known without trusting any quantizer.
"""

import json
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from modelpress.errors import ConfigError, UnknownTechniqueError
from modelpress.optimize.configs import TechniqueConfig, register_config
from modelpress.optimize.handlers import copy_model_files, register_handler, write_variant
from modelpress.optimize.recipe import Recipe, run_recipe

# The test-only technique below is tested here (the handler-completeness test reads this).
COVERED = {("WeightNoise", "torch")}

EVAL_PAIRS = 150  # enough STS-B dev pairs for a stable Spearman (about +-0.02), small enough to be quick


@register_config
class WeightNoise(TechniqueConfig):
    """Test-only: Gaussian noise of ``sigma`` times each weight's std added to every 2-D weight."""

    technique_name: ClassVar[str] = "test-weight-noise"
    supported_runtimes: ClassVar[tuple[str, ...]] = ("torch",)
    technique: Literal["test-weight-noise"] = "test-weight-noise"
    runtime: Literal["torch"] = "torch"
    sigma: float = 0.0


@register_handler(WeightNoise, "torch")
def _noise(source, config, ctx):
    import torch
    from safetensors.torch import load_file, save_file

    def fill(tmp: Path):
        copy_model_files(source.path, tmp, skip=("modelpress.json", "model.safetensors"))
        weights = load_file(str(source.path / "model.safetensors"))
        g = torch.Generator().manual_seed(0)
        for k, w in weights.items():
            if w.ndim == 2 and config.sigma > 0:
                weights[k] = w + torch.randn(w.shape, generator=g) * w.float().std() * config.sigma
        save_file(weights, str(tmp / "model.safetensors"))
        return {"metrics": {"sigma": config.sigma}}

    return write_variant(source, config, ctx, fmt="hf", model_file=None, fill=fill)


def test_yaml_typo_lists_the_valid_keys():
    with pytest.raises(ConfigError) as exc:
        Recipe.from_yaml("steps:\n  - technique: dynamic-int8\n    per_chanel: true\n")
    assert "per_chanel" in exc.value.message and "Did you mean 'per_channel'" in exc.value.message
    assert "per_channel" in exc.value.hint and "exclude" in exc.value.hint


def test_recipe_level_typo_and_unknown_technique():
    with pytest.raises(ConfigError, match="on_failur"):
        Recipe.from_dict({"steps": [{"technique": "dynamic-int8"}], "on_failur": "skip"})
    with pytest.raises(UnknownTechniqueError, match="Did you mean 'static-int8'"):
        Recipe.from_dict({"steps": [{"technique": "statc-int8"}]})
    with pytest.raises(ConfigError, match="not valid YAML"):
        Recipe.from_yaml("steps: [unclosed")
    with pytest.raises(ConfigError, match="does not exist"):
        Recipe.from_file("/nonexistent/recipe.yaml")


def test_recipe_round_trips_through_yaml_and_json(tmp_path):
    r = Recipe.from_dict(
        {
            "name": "r",
            "mode": "branch",
            "gate": {"spearman": {"min_recovery": 0.99}},
            "steps": [
                {"technique": "dynamic-int8", "per_channel": True},
                {"technique": "static-int8", "runtime": "openvino", "calibration": {"samples": 16}},
            ],
        }
    )
    again = Recipe.from_yaml(r.to_yaml())
    assert again.to_dict() == r.to_dict()
    (tmp_path / "r.json").write_text(json.dumps(r.to_dict()))
    assert Recipe.from_file(tmp_path / "r.json").to_dict() == r.to_dict()
    assert again.steps[1].calibration.samples == 16


@pytest.mark.needs_data
@pytest.mark.slow
def test_a_step_that_breaks_the_gate_is_reported_and_not_shipped(tmp_path, data_dir, minilm_path):
    recipe = Recipe.from_dict(
        {
            "name": "noise",
            "mode": "chain",
            "on_failure": "skip",
            "gate": {"spearman": {"min_recovery": 0.99}, "mean_cosine": {"min_value": 0.999}},
            "steps": [{"technique": "test-weight-noise", "sigma": 0.0}, {"technique": "test-weight-noise", "sigma": 2.0}],
        }
    )
    res = run_recipe("minilm", recipe, tmp_path / "out", data="stsb-dev", limit=EVAL_PAIRS, threads=2)
    ok, bad = res.steps
    assert ok.shipped and ok.gate.passed
    assert ok.gate.rows[0].recovery == pytest.approx(1.0, abs=1e-6)  # no noise: the same weights
    assert not bad.shipped and not bad.gate.passed
    assert {r.metric for r in bad.gate.failures} == {"spearman", "mean_cosine"}  # both failures reported
    assert "recovery" in bad.gate.rows[0].reason and "short by" in bad.gate.rows[0].reason
    # the rejected variant is out of the shippable folders, marked, and the report says so
    assert Path(bad.path).parent.name == "rejected"
    manifest = json.loads((Path(bad.path) / "modelpress.json").read_text())
    assert manifest["metrics"]["shippable"] is False and manifest["metrics"]["gate"]["passed"] is False
    shipped = json.loads((Path(ok.path) / "modelpress.json").read_text())
    assert shipped["metrics"]["shippable"] is True and shipped["step"]["technique"] == "test-weight-noise"
    assert shipped["parent"] and shipped["tool_versions"]["torch"]
    assert res.final is ok
    report = json.loads((tmp_path / "out/recipe-report.json").read_text())
    assert [s["shipped"] for s in report["steps"]] == [True, False]


@pytest.mark.needs_data
@pytest.mark.slow
def test_on_failure_stop_ends_the_recipe(tmp_path, data_dir):
    recipe = {
        "on_failure": "stop",
        "steps": [{"technique": "test-weight-noise", "sigma": 3.0}, {"technique": "test-weight-noise", "sigma": 0.0}],
    }
    res = run_recipe("minilm", recipe, tmp_path / "out", data="stsb-dev", limit=EVAL_PAIRS, threads=2)
    assert len(res.steps) == 1 and not res.steps[0].shipped and res.final is None


def test_output_folder_must_be_empty(tmp_path, minilm_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/x").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        run_recipe("minilm", {"steps": [{"technique": "test-weight-noise"}]}, tmp_path / "out")
    assert (tmp_path / "out/x").read_text() == "keep me"


@pytest.mark.needs_data
@pytest.mark.slow
def test_shipped_steps_are_registered_with_lineage_and_rejected_ones_are_not(tmp_path, data_dir):
    from modelpress.registry.api import Registry

    recipe = {
        "on_failure": "skip",
        "steps": [{"technique": "test-weight-noise", "sigma": 0.0}, {"technique": "test-weight-noise", "sigma": 2.0}],
    }
    with Registry(home=tmp_path / "home") as reg:
        res = run_recipe(
            "minilm", recipe, tmp_path / "out", data="stsb-dev", limit=EVAL_PAIRS, threads=2, register=True, registry=reg, name="minilm"
        )
        assert res.registered_original == "minilm:1"
        assert res.steps[0].registered == "minilm:2" and res.steps[1].registered is None
        assert [v.version for v in reg.list_versions("minilm")] == [1, 2]
        tree = reg.lineage("minilm:1")
        child = tree["root"]["children"][0]
        assert child["ref"] == "minilm:2" and child["step"] == "test-weight-noise"
        assert child["metrics"]["spearman"] == pytest.approx(res.steps[0].evaluation["metrics"]["spearman"])
        # running it again registers nothing new: the same files and settings are the same versions
        again = run_recipe(
            "minilm", recipe, tmp_path / "out2", data="stsb-dev", limit=EVAL_PAIRS, threads=2, register=True, registry=reg, name="minilm"
        )
        assert again.registered_original == "minilm:1" and again.steps[0].registered == "minilm:2"
        assert len(reg.list_versions("minilm")) == 2
