"""Loading from the registry, hot swap under traffic, graceful drain, configs and the serve command."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from modelpress.errors import ConfigError
from modelpress.serving.config import BatchConfig, ModelConfig, ServerConfig, load_config

from .conftest import add_model, client_for, make_server, text_request, wait_for


@pytest.mark.anyio
async def test_hot_swap_in_process_under_concurrent_traffic_fails_nothing(tiny_encoder):
    server = make_server()
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc", version="1")
        statuses: list[int] = []
        versions: list[str] = []
        swapped = asyncio.Event()

        async def traffic() -> None:
            while not swapped.is_set() or versions[-1] != "2":
                r = await c.post("/v2/models/enc/infer", json=text_request(["during the swap"]))
                statuses.append(r.status_code)
                versions.append(r.json().get("model_version", "?"))

        clients = [asyncio.ensure_future(traffic()) for _ in range(4)]
        await wait_for(lambda: len(statuses) >= 8, 30, "traffic before the swap")
        await server.repository.load(ModelConfig(source=str(tiny_encoder), name="enc", version="2", threads=1))
        swapped.set()
        await asyncio.wait_for(asyncio.gather(*clients), 30)
        assert set(statuses) == {200}
        assert versions.count("1") >= 8 and versions[-1] == "2"
        assert list(server.repository.routers["enc"].versions) == ["2"]
        # an explicitly named old version is gone; the new one answers by name
        assert (await c.post("/v2/models/enc/versions/1/infer", json=text_request(["a"]))).status_code == 404
        assert (await c.post("/v2/models/enc/versions/2/infer", json=text_request(["a"]))).status_code == 200


def test_graceful_drain_lets_in_flight_requests_finish(tiny_encoder):
    server = make_server(drain_timeout_s=20)
    with server.in_thread() as running:
        runner = asyncio.run_coroutine_threadsafe(add_model(server, str(tiny_encoder), "enc", record=True), server.loop).result(60)
        runner.delay_s = 0.4  # each batch takes 0.4 s: the requests below are in flight at shutdown
        results: list[int] = []

        def one(i: int) -> None:
            with httpx.Client(base_url=running.url, timeout=30) as client:
                results.append(client.post("/v2/models/enc/infer", json=text_request([f"request {i}"])).status_code)

        clients = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in clients:
            t.start()
        lv = server.repository.get("enc")
        for _ in range(1000):  # all four requests reached the model (one running, three queued)
            if lv.inflight == 4:
                break
            threading.Event().wait(0.01)
        assert lv.inflight == 4 and runner.entered.is_set()
        running.stop(wait=False)  # what SIGTERM does
        for t in clients:
            t.join(30)
        running.thread.join(30)
        assert not running.thread.is_alive()
        assert sorted(results) == [200, 200, 200, 200]
        assert server.draining
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{running.url}/v2/health/live", timeout=2)


@pytest.mark.anyio
async def test_serves_registry_references(tiny_encoder, tmp_path):
    import modelpress as mp
    from modelpress.registry.api import Registry

    url = str(tmp_path / "reg.db")
    with Registry(url) as reg:
        reg.register(mp.load(str(tiny_encoder)), "tiny-enc", stage="production")
        reg.register(mp.load(str(tiny_encoder)), "tiny-enc", metrics={"note": 1.0})
    server = make_server(registry=url, models=[ModelConfig(source="tiny-enc@production", threads=1)])
    async with client_for(server) as c:
        meta = (await c.get("/v2/models/tiny-enc")).json()
        assert meta["versions"] == ["1"]  # the production version, named and numbered as in the registry
        assert (await c.post("/v2/models/tiny-enc/infer", json=text_request(["a"]))).json()["model_version"] == "1"
        await server.repository.load(server.repository.config_for("tiny-enc", {"source": "tiny-enc:2"}))
        assert (await c.post("/v2/models/tiny-enc/infer", json=text_request(["a"]))).json()["model_version"] == "2"
        assert (await c.get("/v2/models/tiny-enc/config")).json()["parameters"]["registry_ref"] == "tiny-enc:2"


@pytest.mark.anyio
async def test_openai_and_sagemaker_in_process(tiny_encoder, tiny_classifier):
    server = make_server()
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        r = await c.post("/v1/embeddings", json={"model": "enc", "input": [[101, 7592, 102], [101, 102]]})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 5
        for body, status, message in [
            ({"model": "enc", "input": []}, 400, "non-empty"),
            ({"model": "enc", "input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
            ({"model": "enc", "input": "a", "dimensions": 7}, 400, "32-dimensional"),
            ({"input": "a"}, 400, "model: Field required"),
            ({"model": "nope", "input": "a"}, 404, "No model named"),
        ]:
            r = await c.post("/v1/embeddings", json=body)
            assert r.status_code == status and message in r.json()["error"]["message"], r.text
        assert (await c.get("/ping")).status_code == 200
        r = await c.post("/invocations", json={"inputs": ["a cat", "a dog"]})
        assert r.status_code == 200 and len(r.json()["embeddings"]) == 2
        r = await c.post("/invocations", content=b"plain text body", headers={"content-type": "text/plain"})
        assert r.status_code == 415  # what a web page can send cross-site without a preflight (docs/security.md)
        r = await c.post("/invocations", json="one text")
        assert len(r.json()["embeddings"]) == 1
        await add_model(server, str(tiny_classifier), "cls")
        assert (await c.post("/invocations", json={"inputs": ["a"]})).status_code == 400  # two models: say which
        r = await c.post("/invocations", json=["what a film"], headers={"X-Amzn-SageMaker-Target-Model": "cls"})
        assert r.json()["predictions"][0]["label"] in ("negative", "positive")
        r = await c.post("/v1/embeddings", json={"model": "cls", "input": "a"})
        assert r.status_code == 400 and "needs an embedding model" in r.json()["error"]["message"]


@pytest.mark.anyio
async def test_metrics_series(tiny_encoder):
    server = make_server()
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        await c.post("/v2/models/enc/infer", json=text_request(["a", "b"]))
        await c.post("/v1/embeddings", json={"model": "enc", "input": "a"})
        text = (await c.get("/metrics")).text
    for series in [
        'modelpress_requests_total{model="enc",protocol="kserve_v2",status="200",version="1"} 1.0',
        'modelpress_requests_total{model="enc",protocol="openai",status="200",version="1"} 1.0',
        'modelpress_request_duration_seconds_count{model="enc",protocol="openai",status="200",version="1"} 1.0',
        'modelpress_queue_time_seconds_count{model="enc",version="1"} 3.0',
        'modelpress_batch_size_sum{model="enc",version="1"} 3.0',
        'modelpress_batch_duration_seconds_count{model="enc",version="1"} 2.0',
        'modelpress_inflight_requests{model="enc",version="1"} 0.0',
        'modelpress_queue_depth{model="enc",version="1"} 0.0',
        'modelpress_model_load_seconds{model="enc",version="1"}',
    ]:
        assert series in text, series


def test_configs_round_trip_and_reject_typos(tmp_path):
    import yaml

    cfg = ServerConfig(
        models=[ModelConfig(source="minilm", name="m", runtime="onnxruntime", batching=BatchConfig(max_batch_size=8))], api_key="k" * 16
    )
    assert ServerConfig.model_validate_json(cfg.model_dump_json()) == cfg
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    assert load_config(tmp_path / "serve.yaml") == cfg
    (tmp_path / "typo.yaml").write_text("models:\n  - source: minilm\n    batching: {max_batch_sise: 8}\n")
    with pytest.raises(ConfigError, match="max_batch_sise"):
        load_config(tmp_path / "typo.yaml")
    (tmp_path / "dup.json").write_text(json.dumps({"models": [{"source": "a", "name": "x"}, {"source": "b", "name": "x"}]}))
    with pytest.raises(ConfigError, match="repeated: x"):
        load_config(tmp_path / "dup.json")
    with pytest.raises(ConfigError, match="max_batch_size"):
        ServerConfig.from_models(["minilm"], max_batch_size=0)


def test_serve_command_reports_a_model_that_cannot_load(tmp_path):
    from typer.testing import CliRunner

    from modelpress.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing-model"), "--port", "0"])
    assert result.exit_code == 2
    assert "missing-model" in result.output and "Traceback" not in result.output
