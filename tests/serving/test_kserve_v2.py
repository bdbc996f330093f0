"""KServe v2 in process: metadata, inference (JSON and binary), bad inputs, batching, limits, keys."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import orjson
import pytest

from .conftest import add_model, client_for, make_server, text_request, wait_for

WAIT_S = 10  # a queued request reaches the batcher in milliseconds; this only bounds a hung test

pytestmark = pytest.mark.anyio
API_KEY = "test-key-123456"


async def test_health_metadata_and_infer(tiny_encoder, tiny_classifier):
    server = make_server()
    async with client_for(server) as c:
        assert (await c.get("/v2/health/ready")).status_code == 503  # nothing loaded yet
        await add_model(server, str(tiny_encoder), "enc")
        await add_model(server, str(tiny_classifier), "cls")
        assert (await c.get("/v2/health/live")).json() == {"live": True}
        assert (await c.get("/v2/health/ready")).json() == {"ready": True}
        meta = (await c.get("/v2")).json()
        assert meta["name"] == "modelpress" and "binary_tensor_data" in meta["extensions"]
        m = (await c.get("/v2/models/enc")).json()
        assert m["versions"] == ["1"] and m["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        assert m["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 32]}]
        assert (await c.get("/v2/models/enc/versions/1/ready")).json()["ready"] is True

        r = await c.post("/v2/models/enc/infer", json={"id": "req-7", **text_request(["a cat", "a dog sleeps"])})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == "req-7" and body["model_name"] == "enc" and body["model_version"] == "1"
        out = body["outputs"][0]
        assert out["name"] == "embedding" and out["shape"] == [2, 32] and len(out["data"]) == 64
        emb = np.asarray(out["data"]).reshape(2, 32)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)  # the tiny encoder normalises

        r = await c.post("/v2/models/cls/versions/1/infer", json=text_request(["great film"]))
        names = {o["name"]: o for o in r.json()["outputs"]}
        assert names["label"]["datatype"] == "BYTES" and names["label"]["data"][0] in ("negative", "positive")
        assert names["label_id"]["datatype"] == "INT64" and names["scores"]["shape"] == [1, 2]
        config = (await c.get("/v2/models/cls/config")).json()
        assert config["max_batch_size"] == 32 and config["input"][0]["data_type"] == "TYPE_STRING"


async def test_binary_tensor_extension_in_and_out(tiny_encoder):
    server = make_server()
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        texts = ["a cat", "ünïcode text"]
        blob = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
        head = orjson.dumps(
            {
                "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}],
                "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}],
            }
        )
        r = await c.post("/v2/models/enc/infer", content=head + blob, headers={"Inference-Header-Content-Length": str(len(head))})
        assert r.status_code == 200, r.text
        n = int(r.headers["inference-header-content-length"])
        doc = orjson.loads(r.content[:n])
        size = doc["outputs"][0]["parameters"]["binary_data_size"]
        binary = np.frombuffer(r.content[n : n + size], dtype="<f4").reshape(2, 32)
        as_json = (await c.post("/v2/models/enc/infer", json=text_request(texts))).json()["outputs"][0]["data"]
        np.testing.assert_allclose(binary, np.asarray(as_json, dtype=np.float32).reshape(2, 32), rtol=0, atol=1e-6)


async def test_every_bad_input_gets_its_4xx_and_the_server_still_serves(tiny_encoder, tiny_cnn):
    server = make_server(max_body_bytes=1 << 20)
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        await add_model(server, tiny_cnn, "cnn", task="image-classification")
        image = {"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}
        cases = [
            ("malformed JSON", "enc", b'{"inputs": [', 400, "not valid JSON"),
            ("not an object", "enc", b"[1, 2]", 400, "JSON object"),
            ("no inputs", "enc", b'{"inputs": []}', 400, "no 'inputs'"),
            ("empty input", "enc", orjson.dumps(text_request([])), 400, "no inputs"),
            (
                "wrong shape",
                "enc",
                orjson.dumps({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a"]}]}),
                400,
                "needs 3",
            ),
            (
                "wrong dtype",
                "enc",
                orjson.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
                400,
                "must be BYTES",
            ),
            ("data not of its dtype", "cnn", orjson.dumps({"inputs": [{**image, "datatype": "INT64"}]}), 400, "INT64"),
            (
                "unknown datatype",
                "enc",
                orjson.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "STRING", "data": ["a"]}]}),
                400,
                "datatype",
            ),
            ("unknown input", "enc", orjson.dumps(text_request(["a"], name="sentence")), 400, "no input 'sentence'"),
            ("unknown model", "nope", orjson.dumps(text_request(["a"])), 404, "No model named 'nope'"),
            ("unknown version", "enc/versions/9", orjson.dumps(text_request(["a"])), 404, "no version '9'"),
            ("10 MB string", "enc", orjson.dumps(text_request(["x" * 10_000_000])), 413, "at most 1,048,576"),
            ("long string under the body limit", "enc", orjson.dumps(text_request(["x" * 200_000])), 400, "at most 100,000 per text"),
            ("NaN literal", "cnn", b'{"inputs": [{"name": "image", "shape": [1, 1, 1], "datatype": "FP32", "data": [NaN]}]}', 400, "NaN"),
            ("NaN in binary data", "cnn", None, 400, "NaN or infinite"),
            ("wrong image shape", "cnn", orjson.dumps({"inputs": [{**image, "shape": [1, 28, 27], "data": [0.5] * 756}]}), 400, "shape"),
            (
                "negative shape",
                "enc",
                orjson.dumps({"inputs": [{"name": "text", "shape": [-1], "datatype": "BYTES", "data": []}]}),
                400,
                "greater than or equal to 0",
            ),
        ]
        nan = np.full((1, 28, 28), 0.5, dtype="<f4")
        nan[0, 0, 0] = np.nan
        nan_head = orjson.dumps(
            {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "parameters": {"binary_data_size": nan.nbytes}}]}
        )
        for what, model, body, status, message in cases:
            headers = {"content-type": "application/json"}
            if body is None:
                body = nan_head + nan.tobytes()
                headers["inference-header-content-length"] = str(len(nan_head))
            r = await c.post(f"/v2/models/{model}/infer", content=body, headers=headers)
            assert r.status_code == status, f"{what}: {r.status_code} {r.text[:200]}"
            assert message in r.json()["error"], f"{what}: {r.json()['error']}"
        ok = await c.post("/v2/models/enc/infer", json=text_request(["still serving"]))
        assert ok.status_code == 200
        ok = await c.post("/v2/models/cnn/infer", json={"inputs": [image]})
        assert ok.status_code == 200 and ok.json()["outputs"][1]["name"] == "label_id"
        metrics = (await c.get("/metrics")).text
        assert 'modelpress_requests_total{model="enc",protocol="kserve_v2",status="400",version=""}' in metrics
        assert 'status="500"' not in metrics


async def test_concurrent_requests_are_batched_together(tiny_encoder):
    server = make_server()
    async with client_for(server) as c:
        # one instance: the rows queued behind the held batch must wait for it (a second instance would run them at once)
        runner = await add_model(server, str(tiny_encoder), "enc", record=True, max_batch_size=16, instances=1)
        runner.gate.clear()
        lv = server.repository.get("enc")
        first = asyncio.ensure_future(c.post("/v2/models/enc/infer", json=text_request(["first"])))
        await wait_for(runner.entered.is_set, WAIT_S, "the first batch to run")
        rest = [asyncio.ensure_future(c.post("/v2/models/enc/infer", json=text_request([f"sentence number {i}"]))) for i in range(12)]
        await wait_for(lambda: lv.batcher.depth == 12, WAIT_S, "twelve queued rows")
        runner.gate.set()
        responses = await asyncio.gather(first, *rest)
        assert all(r.status_code == 200 for r in responses)
        assert runner.sizes == [1, 12]  # the twelve waiting requests ran as one batch
        metrics = (await c.get("/metrics")).text
        assert 'modelpress_batch_size_bucket{le="16.0",model="enc",version="1"} 2.0' in metrics
        assert 'modelpress_batch_size_count{model="enc",version="1"} 2.0' in metrics


async def test_full_queue_is_429_with_retry_after_and_timeout_is_504(tiny_encoder):
    server = make_server()
    async with client_for(server) as c:
        # one instance: the queue fills behind the held batch (a second instance would take the queued rows)
        runner = await add_model(server, str(tiny_encoder), "enc", record=True, max_queue_size=2, timeout_s=0.3, instances=1)
        runner.gate.clear()
        first = asyncio.ensure_future(c.post("/v2/models/enc/infer", json=text_request(["a"])))
        await wait_for(runner.entered.is_set, WAIT_S, "the first batch to run")
        waiting = asyncio.ensure_future(c.post("/v2/models/enc/infer", json=text_request(["b", "c"])))
        await wait_for(lambda: server.repository.get("enc").batcher.depth == 2, WAIT_S, "two queued rows")
        full = await c.post("/v2/models/enc/infer", json=text_request(["d"]))
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert "rows queued" in full.json()["error"]
        assert (await waiting).status_code == 504  # still queued behind the held batch after 0.3 s
        assert (await first).status_code == 504
        runner.gate.set()
        assert (await c.post("/v2/models/enc/infer", json=text_request(["e"]))).status_code == 200


async def test_request_ids_are_echoed_or_made(tiny_encoder):
    server = make_server()
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        r = await c.post("/v2/models/enc/infer", json=text_request(["a"]), headers={"x-request-id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        made = (await c.get("/v2/health/live")).headers["x-request-id"]
        assert len(made) == 16 and made != (await c.get("/v2/health/live")).headers["x-request-id"]
        assert (await c.get("/v2/models/nope", headers={"x-request-id": "y" * 500})).headers["x-request-id"] != "y" * 500


async def test_management_endpoints_need_the_key_and_inference_optionally(tiny_encoder, tiny_classifier):
    server = make_server(api_key=API_KEY, allow_load_from=[str(tiny_classifier.parent)])
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        assert (await c.post("/v2/repository/index")).status_code == 401
        wrong = await c.post("/v2/repository/index", headers={"x-api-key": API_KEY[:-1] + "x"})
        assert wrong.status_code == 401 and "wrong" in wrong.json()["error"]
        index = await c.post("/v2/repository/index", headers={"authorization": f"Bearer {API_KEY}"})
        assert index.json() == [{"name": "enc", "version": "1", "state": "READY", "reason": ""}]
        body = {"parameters": {"config": orjson.dumps({"source": str(tiny_classifier)}).decode()}}
        assert (await c.post("/v2/repository/models/cls/load", json=body)).status_code == 401
        assert (await c.post("/v2/repository/models/cls/load", json=body, headers={"x-api-key": API_KEY})).status_code == 200
        assert (await c.post("/v2/models/cls/infer", json=text_request(["a"]))).status_code == 200  # inference is open
        bad = await c.post(
            "/v2/repository/models/x/load", json={"parameters": {"source": "/no/such/model"}}, headers={"x-api-key": API_KEY}
        )
        assert bad.status_code == 403 and "--allow-load-from" in bad.json()["error"]  # outside the allow-list
        missing = str(tiny_classifier.parent / "no-such-model")
        bad = await c.post("/v2/repository/models/x/load", json={"parameters": {"source": missing}}, headers={"x-api-key": API_KEY})
        assert bad.status_code == 400 and "no-such-model" in bad.json()["error"]
        assert (await c.post("/v2/repository/models/cls/unload", headers={"x-api-key": API_KEY})).status_code == 200
        assert (await c.post("/v2/models/cls/infer", json=text_request(["a"]))).status_code == 404
    protected = make_server(api_key=API_KEY, protect_inference=True)
    async with client_for(protected) as c:
        await add_model(protected, str(tiny_encoder), "enc")
        assert (await c.post("/v2/models/enc/infer", json=text_request(["a"]))).status_code == 401
        assert (await c.post("/v2/models/enc/infer", json=text_request(["a"]), headers={"x-api-key": API_KEY})).status_code == 200
