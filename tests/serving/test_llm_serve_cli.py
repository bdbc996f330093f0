"""`modelpress serve --engine`: the engine named on the command line reaches the model's config."""

from __future__ import annotations

from typer.testing import CliRunner

from modelpress.cli.main import app


def test_serve_passes_the_engine_to_the_model_config(monkeypatch):
    import modelpress.rollout

    seen = []
    monkeypatch.setattr(modelpress.rollout, "serve", seen.append)  # capture the config instead of serving
    result = CliRunner().invoke(app, ["serve", "some/llm-folder", "--engine", "openvino", "--max-batch-size", "4"])
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert cfg.models[0].engine == "openvino" and cfg.models[0].batching.max_batch_size == 4
    result = CliRunner().invoke(app, ["serve", "some/llm-folder"])
    assert result.exit_code == 0 and seen[1].models[0].engine is None  # None: the torch engine
