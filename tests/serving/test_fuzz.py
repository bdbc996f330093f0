"""Property-based fuzzing of every route the server documents (issue 12, item 5).

schemathesis reads the server's own ``/openapi.json`` (request bodies are the handlers' pydantic
models, so what is fuzzed is what is validated) and, for every operation, sends a bounded number of
generated requests, valid and invalid by the schema, once without the key and once with it:
no answer may be a 5xx, none may take longer than :data:`MAX_ANSWER_S`, and the server must still
be ready afterwards. The KServe infer routes are fuzzed with both their content types (JSON and
the binary tensor extension's ``application/octet-stream``, with its ``Inference-Header-Content-Length``).

The stories260k causal LM (shared data; fuzzed against the encoder alone when absent) is served
beside the encoder, and part of the bodies name a served model (generation capped at
:data:`FUZZ_MAX_TOKENS`), so embeddings, completions and chat reach decoding and the engine. Every
operation with a body must answer 2xx to some schema-valid request naming a served model (the schema
says no more than the handler accepts), except those in :data:`NO_2XX_EXPECTED`, each with its reason.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from modelpress.serving.config import BatchConfig, ModelConfig
from modelpress.serving.security import route_kind

from .conftest import make_server

API_KEY = "fuzz-key-0123456789"
EXAMPLES_PER_MODE = 10  # generated requests per operation and generation mode (valid, invalid): bounded so the test stays fast
MAX_ANSWER_S = 2.0  # the slowest acceptable answer to any request, valid or not
LLM = "stories260k"  # the causal LM served beside the encoder (completions and chat reach its generation engine)
FUZZ_MAX_TOKENS = 4  # generated requests naming the LM generate at most this many tokens (the schema allows up to 2^20)
# operations with a body that no schema-valid request can answer 2xx here, and why
NO_2XX_EXPECTED = {
    "POST /rollouts/{model}/start": "a rollout needs a candidate version other than the one served; the fuzzer has none",
    "POST /rollouts/{model}/abort": "only a running rollout can be aborted; the fuzzer starts none",
    "POST /rollouts/{model}/rollback": "a rollback needs a version that served before; the fuzzer loads none",
    "POST /feedback": "feedback names the id of a request the server answered; generated ids are unknown (404)",
    "POST /v2/repository/models/{model}/load": "random names are not loadable sources, and the served models are not fuzzed "
    "through management routes (a generated load or unload could replace the model under test)",
    "POST /v2/repository/models/{model}/unload": "idem: unloading the served models would end the test",
}


@pytest.fixture(scope="module")
def fuzzed_server(tiny_encoder, tmp_path_factory):
    import os

    from modelpress.locations import find_data_dir

    home = tmp_path_factory.mktemp("fuzz-home")
    old = os.environ.get("MODELPRESS_HOME")
    os.environ["MODELPRESS_HOME"] = str(home)  # the registry the load route may look in: an empty one
    models = [ModelConfig(source=str(tiny_encoder), name="enc", threads=1)]
    data = find_data_dir()
    llm = Path(data) / "models" / LLM if data is not None else None
    if llm is not None and (llm / "config.json").is_file():  # absent: the LLM routes are fuzzed against the encoder only
        models.append(ModelConfig(source=str(llm), name=LLM, threads=1, batching=BatchConfig(max_batch_size=4, max_queue_size=8)))
    try:
        server = make_server(api_key=API_KEY, models=models)
        with server.in_thread() as running:
            yield server, running.url
    finally:
        if old is None:
            os.environ.pop("MODELPRESS_HOME", None)
        else:
            os.environ["MODELPRESS_HOME"] = old


def _served_names(label: str, server) -> list[str]:
    """The served models a body's "model" is pinned to for ``label`` (the LM for generation, the encoder otherwise)."""
    if label in ("POST /v1/completions", "POST /v1/chat/completions"):
        return [LLM] if LLM in server.repository.routers else ["enc"]
    return ["enc"]


def _pin(name: str):
    """A map over generated cases: the body names the served model ``name``; generation stays short."""

    def pin(case):
        if isinstance(case.body, dict):
            case.body["model"] = name
            for key in ("max_tokens", "max_completion_tokens"):
                if key in case.body or key == "max_tokens":
                    case.body[key] = FUZZ_MAX_TOKENS
        if case.operation.path == "/invocations":  # two models are served: the body goes to the one the header names
            case.headers = {**(case.headers or {}), "x-amzn-sagemaker-target-model": name}
        return case

    return pin


def _fuzz(strategy, label: str, url: str, session, counts: dict[str, int], failures: list[str], ok: set[str] | None = None) -> None:
    """Send EXAMPLES_PER_MODE requests drawn from ``strategy``, each without and with the key; note 5xx and slow answers
    (and, in ``ok``, the operations that answered 2xx to a request with the key)."""

    @settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run: a failure here is reproducible
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case) -> None:
        for headers in ({}, {"x-api-key": API_KEY}):
            started = time.perf_counter()
            response = case.call(base_url=url, session=session, headers=headers, timeout=10)
            seconds = time.perf_counter() - started
            counts[label] = counts.get(label, 0) + 1
            if ok is not None and headers and 200 <= response.status_code < 300:
                ok.add(label)
            if response.status_code >= 500 or seconds > MAX_ANSWER_S:
                failures.append(
                    f"{label} -> {response.status_code} in {seconds:.2f} s "
                    f"(key: {bool(headers)}): {case.as_curl_command()[:600]} :: {response.text[:300]}"
                )

    run()


def test_every_route_holds_under_generated_requests(fuzzed_server):
    import requests

    server, url = fuzzed_server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20  # KServe v2, OpenAI, SageMaker, the repository, rollouts, feedback, dashboard, metrics
    infer = next(op for op in operations if op.method.upper() == "POST" and op.path == "/v2/models/{model}/infer")
    assert any(p.name.lower() == "inference-header-content-length" for p in infer.headers)  # the binary branch is fuzzed
    failures: list[str] = []
    counts: dict[str, int] = {}
    ok: set[str] = set()  # operations that answered 2xx to a schema-valid request naming a served model
    with_body: set[str] = set()
    with requests.Session() as session:
        for op in operations:
            label = f"{op.method.upper()} {op.path}"
            if len(op.body):
                with_body.add(label)
            modes = [schemathesis.GenerationMode.POSITIVE]
            if len(op.body) or len(op.query):  # a string path parameter cannot be made invalid: only bodies and queries are
                modes.append(schemathesis.GenerationMode.NEGATIVE)
            for mode in modes:
                media_types = [None]
                if op.path.endswith("/infer"):
                    media_types = ["application/json", "application/octet-stream"]
                # random model names answer 404 at once; the served model's name sends the same bodies through decoding and
                # the batcher too (inference routes only: management with the key could unload the model under test)
                pinned = [{}]
                if "{model}" in op.path and route_kind(op.path.replace("{model}", "enc")) in ("inference", "health"):
                    pinned.append({k: v for k, v in {"model": "enc", "version": "1"}.items() if f"{{{k}}}" in op.path})
                for media_type, path_parameters in [(m, p) for m in media_types for p in pinned]:
                    kwargs: dict = {"path_parameters": path_parameters} if path_parameters else {}
                    if media_type:
                        kwargs["media_type"] = media_type
                    _fuzz(op.as_strategy(mode, **kwargs), label, url, session, counts, failures, ok if path_parameters else None)
                # bodies that name a served model: embeddings, completions and chat reach decoding and the engine
                if len(op.body) and "{model}" not in op.path and route_kind(op.path) == "inference":
                    for name in _served_names(label, server):
                        positive = mode == schemathesis.GenerationMode.POSITIVE
                        _fuzz(op.as_strategy(mode).map(_pin(name)), label, url, session, counts, failures, ok if positive else None)
                elif len(op.body) and mode == schemathesis.GenerationMode.POSITIVE and "{model}" not in op.path:
                    ok_here: set[str] = set()
                    _fuzz(op.as_strategy(mode), label, url, session, counts, failures, ok_here)
                    ok |= ok_here
            if label.endswith("/infer"):  # a valid infer body must fit the model's own input (name, datatype, shape), which a
                # generic tensor schema cannot say, and generated ones rarely do: the schema's own example is sent too
                doc = schema.raw_schema["paths"][op.path]["post"]["requestBody"]["content"]["application/json"]["schema"]
                pinned_path = {k: v for k, v in {"model": "enc", "version": "1"}.items() if f"{{{k}}}" in op.path}
                case = op.Case(body=doc["example"], media_type="application/json", path_parameters=pinned_path)
                response = case.call(base_url=url, session=session, headers={"x-api-key": API_KEY}, timeout=10)
                if 200 <= response.status_code < 300:
                    ok.add(label)
    assert not failures, "\n".join(failures[:20])
    assert all(counts.get(f"{op.method.upper()} {op.path}") for op in operations)  # every operation was called
    # schema == validation: every operation with a body accepts some schema-valid request (else its schema says too much)
    assert set(NO_2XX_EXPECTED) <= with_body, sorted(set(NO_2XX_EXPECTED) - with_body)  # each exclusion names a real operation
    missing = sorted(with_body - ok - set(NO_2XX_EXPECTED))
    assert not missing, f"no schema-valid request naming a served model got a 2xx from: {missing}"
    with requests.Session() as session:
        assert session.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
        assert (
            session.post(
                f"{url}/v2/models/enc/infer",
                json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["ok"]}]},
                timeout=10,
            ).status_code
            == 200
        )
    assert server.ready and "enc" in server.repository.routers
