"""`modelpress evaluate --engine` and `modelpress bench --engine`: the engines that serve a causal LM, from the CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from modelpress.cli.main import app

runner = CliRunner()


def test_evaluate_with_an_engine_reports_greedy_agreement_with_the_reference(stories260k):
    result = runner.invoke(app, ["evaluate", str(stories260k), "--data", "tinystories", "--engine", "torch", "--json"])
    assert result.exit_code == 0, result.output
    gen = json.loads(result.stdout)["generation"]
    assert gen["engine"] == "torch"
    assert gen["greedy_identical"] == 1.0  # the reference against itself: every prompt's tokens equal
    assert gen["decode_tokens_per_s"] > 0


def test_bench_with_engines_times_decode_and_prints_a_table(stories260k):
    args = ["bench", str(stories260k), "--batch-sizes", "1", "--seq-lens", "16", "--seconds", "0.2", "--engine", "torch"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Decode speed at batch 1" in result.output and "torch" in result.output


def test_an_engine_option_without_its_engine_is_a_clear_error(stories260k):
    result = runner.invoke(app, ["bench", str(stories260k), "--engine", "torch", "--engine-option", "quantize=int4"])
    assert result.exit_code != 0
    assert "ENGINE.KEY=VALUE" in result.output and "openvino.quantize=int4" in result.output
