"""Property-based fuzzing of every route the server documents (issue 12, item 5).

schemathesis reads the server's own ``/openapi.json`` (request bodies are the handlers' pydantic
models, so what is fuzzed is what is validated) and, for every operation, sends a bounded number of
generated requests, valid and invalid by the schema, once without the key and once with it:
no answer may be a 5xx, none may take longer than :data:`MAX_ANSWER_S`, and the server must still
be ready afterwards. The KServe infer routes are fuzzed with both their content types (JSON and
the binary tensor extension's ``application/octet-stream``).
"""

from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from modelpress.serving.config import ModelConfig  # noqa: E402
from modelpress.serving.security import route_kind  # noqa: E402

from .conftest import make_server  # noqa: E402

API_KEY = "fuzz-key-0123456789"
EXAMPLES_PER_MODE = 10  # generated requests per operation and generation mode (valid, invalid): bounded so the test stays fast
MAX_ANSWER_S = 2.0  # the slowest acceptable answer to any request, valid or not


@pytest.fixture(scope="module")
def fuzzed_server(tiny_encoder, tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("fuzz-home")
    old = os.environ.get("MODELPRESS_HOME")
    os.environ["MODELPRESS_HOME"] = str(home)  # the registry the load route may look in: an empty one
    try:
        server = make_server(api_key=API_KEY, models=[ModelConfig(source=str(tiny_encoder), name="enc", threads=1)])
        with server.in_thread() as running:
            yield server, running.url
    finally:
        if old is None:
            os.environ.pop("MODELPRESS_HOME", None)
        else:
            os.environ["MODELPRESS_HOME"] = old


def _fuzz(strategy, label: str, url: str, session, counts: dict[str, int], failures: list[str]) -> None:
    """Send EXAMPLES_PER_MODE requests drawn from ``strategy``, each without and with the key; note 5xx and slow answers."""

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
    failures: list[str] = []
    counts: dict[str, int] = {}
    with requests.Session() as session:
        for op in operations:
            label = f"{op.method.upper()} {op.path}"
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
                    _fuzz(op.as_strategy(mode, **kwargs), label, url, session, counts, failures)
    assert not failures, "\n".join(failures[:20])
    assert all(counts.get(f"{op.method.upper()} {op.path}") for op in operations)  # every operation was called
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
