"""Hostile request bodies (issue 12): every one answers 4xx quickly, nothing leaks a path, 500s say nothing."""

from __future__ import annotations

import time

import orjson
import pytest

from modelpress.errors import ModelpressRuntimeError

from .conftest import add_model, client_for, make_server, text_request

pytestmark = pytest.mark.anyio
API_KEY = "test-key-0123456789"
HOSTILE_ANSWER_S = 0.5  # a 4xx to a hostile body must come at once (the 400k-dim shape took 2.6 s on 7cae499)


@pytest.fixture
async def served(tiny_encoder, tiny_classifier, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    server = make_server(api_key=API_KEY)
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        yield server, c


async def test_huge_shape_lists_are_refused_at_once_for_any_model(served):
    _, c = served
    long_shape = orjson.dumps({"inputs": [{"name": "text", "shape": [2] * 400_000, "datatype": "BYTES", "data": ["a"]}]})
    huge_count = orjson.dumps({"inputs": [{"name": "text", "shape": [1 << 27] * 8, "datatype": "BYTES", "data": ["a"]}]})
    past_body = orjson.dumps({"inputs": [{"name": "text", "shape": [10_000_000], "datatype": "BYTES", "data": ["a"]}]})
    for model in ("enc", "no-such-model"):
        for body, message in [(long_shape, "at most 8"), (huge_count, "shape"), (past_body, "more elements than")]:
            started = time.perf_counter()
            r = await c.post(f"/v2/models/{model}/infer", content=body, headers={"content-type": "application/json"})
            seconds = time.perf_counter() - started
            assert r.status_code == 400 and message in r.json()["error"], (model, r.text[:300])
            assert seconds < HOSTILE_ANSWER_S, f"{seconds:.2f} s"


async def test_data_loops_stop_at_the_declared_count_and_nesting(served):
    from modelpress.errors import InvalidInputError
    from modelpress.serving.protocols.tensors import _flatten

    with pytest.raises(InvalidInputError, match="nested deeper"):
        _flatten([[["a"]]], 10, 2, "text")
    assert len(_flatten(list(range(1_000_000)), 3, 1, "x")) == 4  # stops one past the count: no walk over the rest
    _, c = served
    deep = b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ' + b"[" * 1000 + b'"a"' + b"]" * 1000 + b"}]}"
    for body in [
        deep,  # JSON nested 1000 deep
        {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"] * 100_000}]},  # data beyond its shape
        {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}] * 17},  # more tensors than any model takes
    ]:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        r = await c.post("/v2/models/enc/infer", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text[:300]


async def test_malformed_bodies_answer_4xx_not_500(served):
    _, c = served
    for path, body in [
        ("/invocations", b'{"inputs": 5}'),
        ("/invocations", b'{"inputs": null}'),
        ("/invocations", b"null"),
        ("/invocations", b"0"),
        ("/invocations", b"{}"),
        ("/v1/embeddings", b'{"model": "enc", "input": 5}'),
        ("/v1/embeddings", b"[]"),
        ("/v2/models/enc/infer", orjson.dumps({**text_request(["a"]), "outputs": [{"name": "embedding", "parameters": 7}]})),
        ("/v2/models/enc/infer", orjson.dumps({**text_request(["a"]), "outputs": "embedding"})),
        ("/v2/models/enc/infer", orjson.dumps({**text_request(["a"]), "parameters": [1]})),
    ]:
        r = await c.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text[:300])
    r = await c.get("/v2/models/0/ready")  # a model nobody configured or loaded
    assert r.status_code == 404


async def test_no_filesystem_path_reaches_a_client(served, tiny_encoder, tmp_path):
    server, c = served
    for path in ("/v2/models", "/v2/models/enc/config", "/v2/models/enc"):
        r = await c.get(path)
        assert r.status_code == 200 and str(tiny_encoder.parent) not in r.text, r.text
    # a configured model whose load failed: readiness says so, not where the files were
    server.config.models.append(_config(tmp_path / "missing", "gone"))
    server.repository._remember_failure("gone", f"No model at '{tmp_path}/missing' (a secret path)")
    r = await c.get("/v2/models/gone/ready")
    assert r.status_code == 503 and str(tmp_path) not in r.text


def _config(source, name):
    from modelpress.serving.config import ModelConfig

    return ModelConfig(source=str(source), name=name)


async def test_500_class_errors_answer_a_generic_message(served, caplog):
    server, c = served
    lv = server.repository.get("enc")

    def broken(rows):
        raise ModelpressRuntimeError("cannot open /srv/secret/model.onnx")

    lv.batcher.work = broken
    r = await c.post("/v2/models/enc/infer", json=text_request(["a"]))
    assert r.status_code == 500 and "/srv/secret" not in r.text and "Internal error" in r.json()["error"]
    assert any("/srv/secret" in rec.getMessage() for rec in caplog.records)  # the detail is in the server log
