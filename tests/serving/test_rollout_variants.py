"""A variant carries its runtime: tune, then roll out each kind of variant the tuner registered, naming no runtime.

The scenario of a fresh clone: `modelpress rollout start NAME --candidate N` for the tuner's
ONNX Runtime, torch and OpenVINO variants. The server loads each on the runtime its manifest
records, in the background (the start call answers at once with the rollout ``loading``), and
the canary runs to promotion.
"""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

from modelpress.rollout.spec import ACTIVE

from .conftest import make_server, text_request

KEY = "variants-key-12345"
ROLLOUT_TIMEOUT_S = 120  # loading a variant (an ONNX or OpenVINO session, a torch module) and two 0.2 s windows
TUNE_CANDIDATES = [
    "torch",
    {"technique": "dynamic-int8", "runtime": "onnxruntime", "fuse": False},
    {"technique": "precision", "runtime": "torch", "dtype": "bf16", "compile": False},  # compiling takes minutes on 2 cores
]
if importlib.util.find_spec("openvino") is not None:
    TUNE_CANDIDATES.append({"technique": "precision", "runtime": "openvino", "dtype": "fp32"})


def _pairs_file(tmp_path):
    words = ["the cat sat", "a dog ran", "birds sing loudly", "rain falls today", "the sun is warm", "children play outside"]
    rows = ["sentence1,sentence2,score"] + [f"{words[i % 6]} {i},{words[(i + 1) % 6]} {i},{(i % 6) * 1.0}" for i in range(30)]
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _tune_and_register(tiny_encoder, tmp_path, reg_url: str) -> list[tuple[str, str]]:
    """(registry ref, runtime) of every variant the tuner registered; the original is production."""
    from modelpress.optimize.gate import GateConfig
    from modelpress.optimize.search.tune import tune
    from modelpress.registry.api import Registry

    gate = GateConfig(thresholds=[{"metric": "spearman", "min_value": -1.0}])  # a random tiny model: its Spearman means nothing
    with Registry(reg_url) as reg:
        res = tune(
            str(tiny_encoder),
            task="embedding",
            data=str(_pairs_file(tmp_path)),
            candidates=TUNE_CANDIDATES,
            gate=gate,
            budget_s=600,
            threads=1,
            batch_size=4,
            seq_len=16,
            bench_seconds=0.1,
            register=True,
            registry=reg,
            name="tiny",
            use_cache=False,
            report=False,
            exhaustive=True,  # every candidate scored (and registered), not only the fastest passing one
        )
        reg.promote(str(res.registered_original), "production")
    return [(p.registered, p.runtime) for p in res.points if p.registered]


@pytest.mark.slow
def test_each_variant_the_tuner_registered_rolls_out_on_the_runtime_its_manifest_records(tiny_encoder, tmp_path):
    import httpx
    from typer.testing import CliRunner

    from modelpress.cli import app

    reg_url = str(tmp_path / "reg.db")
    variants = _tune_and_register(tiny_encoder, tmp_path, reg_url)
    want = {c["runtime"] for c in TUNE_CANDIDATES if isinstance(c, dict)}
    assert {runtime for _, runtime in variants} == want, variants  # every kind of variant was registered
    cli = CliRunner()
    server = make_server(registry=reg_url, api_key=KEY, models=[{"source": "tiny@production", "threads": 1}])
    with server.in_thread() as running, httpx.Client(base_url=running.url, timeout=60) as c:
        auth = ["--url", running.url, "--api-key", KEY]
        for ref, runtime in variants:
            label = ref.split(":")[1]
            args = ["--candidate", label, "--steps", "50,100", "--window", "200ms", "--min-requests", "3", "--max-p99-ratio", "1000"]
            t0 = time.monotonic()
            r = cli.invoke(app, ["rollout", "start", "tiny", *args, "--json", *auth])  # no runtime named
            assert r.exit_code == 0, r.output
            started = json.loads(r.output)
            assert started["status"] == "loading", started  # the start call answered before the variant was loaded
            assert time.monotonic() - t0 < ROLLOUT_TIMEOUT_S
            deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
            while True:
                assert c.post("/v2/models/tiny/infer", json=text_request(["variant traffic"])).status_code == 200
                doc = c.get("/rollouts/tiny", headers={"x-api-key": KEY}).json()
                if doc["status"] not in ACTIVE:
                    break
                assert time.monotonic() < deadline, doc
            assert doc["status"] == "succeeded" and doc["promoted"] == ref, (ref, runtime, doc.get("reason"), doc["events"])
            loaded = next(e for e in doc["events"] if e["action"] == "loaded")
            assert loaded["runtime"] == runtime, loaded
            meta = c.get(f"/v2/models/tiny/versions/{label}").json()
            assert meta["platform"] == f"modelpress_{runtime}", meta
            assert c.post("/v2/models/tiny/infer", json=text_request(["served by the variant"])).json()["model_version"] == label
