"""The real, unmodified tritonclient[http] and openai clients against a server on a real socket."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from modelpress.serving.config import ModelConfig

from .conftest import make_server, wait_until

API_KEY = "client-key-123456"
# MiniLM served must give what sentence-transformers gives (same weights, fp32 torch on both
# sides); the two differ only in summation order, far below 1e-5 in cosine.
MINILM_MIN_COSINE = 1 - 1e-5


@pytest.fixture(scope="module")
def served(tiny_encoder, tiny_classifier):
    server = make_server(
        models=[ModelConfig(source=str(tiny_encoder), name="enc", threads=1)],
        api_key=API_KEY,
        allow_load_from=[str(tiny_classifier.parent)],  # the load test loads the classifier's folder
    )
    with server.in_thread() as running:
        yield server, running.url


def test_tritonclient_health_metadata_and_infer_binary_and_json(served):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    _server, url = served
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("enc") and not client.is_model_ready("nope")
    assert client.get_server_metadata()["name"] == "modelpress"
    meta = client.get_model_metadata("enc")
    assert meta["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}
    assert client.get_model_config("enc")["max_batch_size"] == 32

    texts = np.array(["a cat sits on the mat", "ünïcode and emoji 🙂"], dtype=object)
    inp = httpclient.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(texts)  # binary tensor data, the client's default
    binary = client.infer("enc", [inp], request_id="r-1")  # outputs binary too (binary_data_output)
    emb = binary.as_numpy("embedding")
    assert emb.shape == (2, 32) and emb.dtype == np.float32
    assert binary.get_response()["id"] == "r-1"

    inp.set_data_from_numpy(texts, binary_data=False)
    as_json = client.infer("enc", [inp], outputs=[httpclient.InferRequestedOutput("embedding", binary_data=False)])
    np.testing.assert_allclose(as_json.as_numpy("embedding"), emb, rtol=0, atol=1e-6)

    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", [inp])
    assert unknown.value.status() == "404" and "No model named 'nope'" in unknown.value.message()
    wrong = httpclient.InferInput("text", [1], "FP32")
    wrong.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    with pytest.raises(InferenceServerException) as bad:
        client.infer("enc", [wrong])
    assert bad.value.status() == "400" and "must be BYTES" in bad.value.message()


def test_tritonclient_repository_load_and_unload_with_the_key(served, tiny_classifier):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    _server, url = served
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    with pytest.raises(InferenceServerException) as denied:
        client.load_model("cls", config=json.dumps({"source": str(tiny_classifier)}))
    assert denied.value.status() == "401"
    key = {"x-api-key": API_KEY}
    client.load_model("cls", config=json.dumps({"source": str(tiny_classifier), "threads": 1}), headers=key)
    assert client.is_model_ready("cls")
    index = {(m["name"], m["version"]): m["state"] for m in client.get_model_repository_index(headers=key)}
    assert index[("cls", "1")] == "READY" and index[("enc", "1")] == "READY"
    inp = httpclient.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array(["what a great film"], dtype=object))
    res = client.infer("cls", [inp])
    assert res.as_numpy("label")[0].decode() in ("negative", "positive") and res.as_numpy("scores").shape == (1, 2)
    client.unload_model("cls", headers=key)
    assert not client.is_model_ready("cls")


def test_hot_swap_under_concurrent_tritonclient_traffic_fails_no_request(served, tiny_encoder):
    import tritonclient.http as httpclient

    server, url = served
    host = url.removeprefix("http://")
    stop = threading.Event()
    seen: list[str] = []
    failures: list[str] = []

    def traffic() -> None:
        client = httpclient.InferenceServerClient(host)
        inp = httpclient.InferInput("text", [1], "BYTES")
        inp.set_data_from_numpy(np.array(["traffic during the swap"], dtype=object))
        while not stop.is_set() or not seen or seen[-1] != "2":
            try:
                seen.append(client.infer("enc", [inp]).get_response()["model_version"])
            except Exception as exc:  # noqa: BLE001  (any failure is what this test is about)
                failures.append(repr(exc))
            if len(seen) > 5000:
                break

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: len(seen) >= 10 or bool(failures), 60, "traffic before the swap")  # traffic flows before the swap starts
    try:
        client = httpclient.InferenceServerClient(host, network_timeout=120)
        client.load_model(
            "enc", config=json.dumps({"source": str(tiny_encoder), "version": "2", "threads": 1}), headers={"x-api-key": API_KEY}
        )
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    assert seen.count("1") >= 10 and seen[-1] == "2"
    assert sorted(server.repository.routers["enc"].versions) == ["2"]  # version 1 drained and closed


def test_openai_client_embeddings_and_models(served):
    import openai

    _server, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed-for-inference", max_retries=0)
    assert "enc" in [m.id for m in client.models.list()]
    res = client.embeddings.create(model="enc", input=["a cat sits on the mat", "a dog"])  # the client asks for base64
    assert [d.index for d in res.data] == [0, 1] and len(res.data[0].embedding) == 32
    assert res.usage.prompt_tokens == res.usage.total_tokens > 4
    floats = client.embeddings.create(model="enc", input="a cat sits on the mat", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, res.data[0].embedding, rtol=0, atol=1e-6)
    with pytest.raises(openai.NotFoundError, match="No model named 'nope'"):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError, match="empty string"):
        client.embeddings.create(model="enc", input="")


@pytest.mark.slow
def test_minilm_end_to_end_matches_sentence_transformers(minilm_path):
    import openai
    from sentence_transformers import SentenceTransformer

    sentences = [
        "A man is playing a guitar.",
        "A woman is slicing tomatoes in the kitchen.",
        "Stock markets fell sharply after the announcement.",
    ]
    server = make_server(models=[ModelConfig(source="minilm", name="minilm")])
    with server.in_thread() as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        served = np.asarray([d.embedding for d in client.embeddings.create(model="minilm", input=sentences).data])
    reference = SentenceTransformer(str(minilm_path), device="cpu").encode(sentences, normalize_embeddings=True)
    cos = (served * reference).sum(1) / np.linalg.norm(served, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() > MINILM_MIN_COSINE, cos
