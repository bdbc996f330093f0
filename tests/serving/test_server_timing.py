"""``server_timing``: each inference answer says where its time went (Server-Timing: decode, queue, batch), off by default."""

from __future__ import annotations

import re

import pytest

from .conftest import add_model, client_for, make_server, text_request

pytestmark = pytest.mark.anyio
STAGE = re.compile(r"^(decode|queue|batch);dur=(\d+\.\d{3})$")


def _stages(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(", "):
        m = STAGE.match(part)
        assert m, header
        out[m.group(1)] = float(m.group(2))
    return out


async def test_server_timing_reports_each_stage_of_an_inference_request(tiny_encoder):
    server = make_server(server_timing=True)
    async with client_for(server) as c:
        runner = await add_model(server, str(tiny_encoder), "enc", record=True, instances=1)
        runner.delay_s = 0.05  # the model takes at least 50 ms: the batch stage must say so
        r = await c.post("/v2/models/enc/infer", json=text_request(["a sentence", "another one"]))
        assert r.status_code == 200
        stages = _stages(r.headers["server-timing"])
        assert set(stages) == {"decode", "queue", "batch"}
        assert stages["batch"] >= 50.0 and stages["decode"] >= 0.0 and stages["queue"] >= 0.0
        assert stages["batch"] > stages["decode"]
        openai = await c.post("/v1/embeddings", json={"model": "enc", "input": "one"})
        assert openai.status_code == 200 and set(_stages(openai.headers["server-timing"])) == {"decode", "queue", "batch"}
        # answers that ran no model have no stages to report
        assert "server-timing" not in (await c.get("/v2/health/live")).headers
        bad = await c.post("/v2/models/enc/infer", json={"inputs": []})
        assert bad.status_code == 400 and "batch" not in bad.headers.get("server-timing", "")


async def test_server_timing_is_off_by_default(tiny_encoder):
    server = make_server()
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        r = await c.post("/v2/models/enc/infer", json=text_request(["a sentence"]))
        assert r.status_code == 200 and "server-timing" not in r.headers


def test_the_serve_command_turns_server_timing_on(monkeypatch):
    from typer.testing import CliRunner

    from modelpress.cli import app
    from modelpress.serving.config import ServerConfig

    served: list[ServerConfig] = []
    monkeypatch.setattr("modelpress.rollout.serve", served.append)  # what the CLI would run: capture its config instead
    result = CliRunner().invoke(app, ["serve", "minilm", "--server-timing"])
    assert result.exit_code == 0, result.output
    assert served[-1].server_timing
    result = CliRunner().invoke(app, ["serve", "minilm"])
    assert result.exit_code == 0, result.output
    assert not served[-1].server_timing
