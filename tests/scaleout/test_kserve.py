"""The KServe InferenceService: validated against KServe's published CRD schema (strict: unknown fields are errors, as
``kubectl apply --validate=strict`` makes them), its storage layout served by our own server as the pod would serve it,
and the canary percent taken from an active rollout in the registry."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelpress.serving.config import BatchConfig

SCHEMA = Path(__file__).parent / "data" / "kserve-inferenceservice-v1beta1.schema.json.gz"  # provenance: data/README.md
BATCHING = BatchConfig(max_batch_size=8, max_queue_delay_ms=3.0, instances=2)


def _strict(node: Any) -> Any:
    """The CRD schema with ``additionalProperties: false`` on every object that lists its properties and does not keep
    unknown fields: the API server's strict field validation (it would otherwise drop a misspelt field silently)."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(x) for x in node]
    return node


@pytest.fixture(scope="module")
def validator() -> Any:
    import jsonschema

    schema = _strict(json.loads(gzip.decompress(SCHEMA.read_bytes())))
    return jsonschema.Draft7Validator(schema)


def errors(validator: Any, manifest: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(manifest)]


@pytest.fixture
def registry(tmp_path, tiny_encoder, monkeypatch) -> Any:
    """A fresh registry (MODELPRESS_HOME) with enc:1 in production and enc:2 (the same weights) as a candidate."""
    import modelpress as mp
    from modelpress.registry.api import Registry

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    for var in ("MODELPRESS_REGISTRY_URL", "MODELPRESS_REGISTRY_STORE"):
        monkeypatch.delenv(var, raising=False)
    with Registry() as reg:
        reg.register(mp.load(str(tiny_encoder)), "enc", stage="production")
        reg.register(mp.load(str(tiny_encoder)), "enc")
    return Registry


def test_manifest_validates_and_its_storage_is_what_our_server_serves(registry, validator, tmp_path):
    from modelpress.scaleout.kserve import write_kserve_manifest
    from modelpress.serving.config import load_config

    w = write_kserve_manifest(
        "enc@production", tmp_path / "k", storage_uri="gs://bucket/mp/", batching=BATCHING, max_replicas=5, cpu="1", memory="1Gi"
    )
    manifest = yaml.safe_load((w.path / "inferenceservice.yaml").read_text())
    assert manifest == w.manifest
    assert errors(validator, manifest) == []
    pred = manifest["spec"]["predictor"]
    assert (pred["minReplicas"], pred["maxReplicas"], pred["scaleMetric"], pred["scaleTarget"]) == (1, 5, "concurrency", 16)
    assert "canaryTrafficPercent" not in pred and w.canary is None
    (c,) = pred["containers"]
    assert c["name"] == "kserve-container" and c["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert c["args"] == ["serve", "--config", "/mnt/models/serve.yaml"]
    env = {e["name"]: e for e in c["env"]}
    assert env["STORAGE_URI"]["value"] == "gs://bucket/mp/enc/1" == w.storage_uri
    assert env["MODELPRESS_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "enc-modelpress", "key": "api-key"}
    assert c["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}
    assert manifest["metadata"]["annotations"]["modelpress.io/registry-ref"] == "enc:1"

    # the storage layout: <name>/<version>/ holds the model and the server config the container reads
    assert sorted(p.name for p in (w.path / "storage" / "enc").iterdir()) == ["1"]
    folder = w.path / "storage" / "enc" / "1"
    cfg = load_config(folder / "serve.yaml")  # the server's own validation
    (m,) = cfg.models
    assert (m.source, m.name, m.version, m.batching) == ("/mnt/models/model", "enc", "1", BATCHING)
    assert (cfg.host, cfg.port) == ("0.0.0.0", 8080)
    assert (folder / "model" / "modelpress.json").is_file()


@pytest.mark.anyio
async def test_the_pod_config_serves_the_model_under_its_name_and_version(registry, tmp_path):
    """The storage folder, mounted where KServe mounts it (here: its local path), serves enc version 1 on KServe v2."""
    import httpx

    from modelpress.rollout import RolloutServer
    from modelpress.scaleout.kserve import write_kserve_manifest
    from modelpress.serving.config import load_config

    w = write_kserve_manifest("enc@production", tmp_path / "k")
    folder = w.path / "storage" / "enc" / "1"
    cfg = load_config(folder / "serve.yaml")
    local = cfg.model_copy(update={"models": [cfg.models[0].model_copy(update={"source": str(folder / "model")})], "host": "127.0.0.1"})
    server = RolloutServer(local.model_copy(update={"access_log": False}))
    transport = httpx.ASGITransport(server.app)
    async with server.running(), httpx.AsyncClient(transport=transport, base_url="http://modelpress.test", timeout=60) as c:
        await server.repository.load(local.models[0])
        meta = (await c.get("/v2/models/enc")).json()
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}
        r = await c.post("/v2/models/enc/infer", json=body)
    assert meta["name"] == "enc" and meta["versions"] == ["1"]
    assert r.status_code == 200 and r.json()["model_version"] == "1"


def test_an_active_rollout_becomes_a_canary(registry, validator, tmp_path):
    from modelpress.scaleout.kserve import write_kserve_manifest

    split = {"policy": "split", "weights": {"2": 10.0, "1": 90.0}, "sticky": True}
    with registry() as reg:
        reg.rollouts.save(
            "enc", model="enc", version=1, traffic_policy=split, rollout_state={"status": "running", "baseline": "1", "candidate": "2"}
        )
    w = write_kserve_manifest("enc@production", tmp_path / "k", storage_uri="s3://m/mp", deployment_mode="Serverless")
    assert errors(validator, w.manifest) == []
    assert w.manifest["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"  # KServe's canary needs it
    pred = w.manifest["spec"]["predictor"]
    assert pred["canaryTrafficPercent"] == 10 and w.version == "2"
    assert w.canary == {"deployment": "enc", "baseline": "1", "candidate": "2", "percent": 10, "policy": "split"}
    assert {e["name"]: e.get("value") for e in pred["containers"][0]["env"]}["STORAGE_URI"] == "s3://m/mp/enc/2"
    assert w.manifest["metadata"]["annotations"]["modelpress.io/baseline"] == "1"
    assert sorted(p.name for p in (w.path / "storage" / "enc").iterdir()) == ["1", "2"]
    assert "version: '2'" in (w.path / "storage" / "enc" / "2" / "serve.yaml").read_text()

    assert (
        "canaryTrafficPercent" not in write_kserve_manifest("enc@production", tmp_path / "n", rollout=False).manifest["spec"]["predictor"]
    )
    with registry() as reg:  # a shadow phase mirrors: no client traffic reaches the candidate
        reg.rollouts.save("enc", model="enc", traffic_policy={"policy": "shadow", "primary": "1", "candidate": "2", "fraction": 1.0})
    assert write_kserve_manifest("enc:1", tmp_path / "s").manifest["spec"]["predictor"]["canaryTrafficPercent"] == 0
    with registry() as reg:  # a finished rollout is no canary
        reg.rollouts.save("enc", model="enc", rollout_state={"status": "succeeded", "baseline": "1", "candidate": "2"})
    assert write_kserve_manifest("enc@production", tmp_path / "f").canary is None


def test_the_strict_schema_catches_what_kubernetes_would_refuse(registry, validator, tmp_path):
    """The check can fail: a misspelt field, a scale metric outside the CRD's enum, a replica count that is not a number."""
    from modelpress.scaleout.kserve import write_kserve_manifest

    good = write_kserve_manifest("enc:2", tmp_path / "k").manifest
    bad = copy.deepcopy(good)
    bad["spec"]["predictor"]["minReplica"] = 1
    assert any("minReplica" in e for e in errors(validator, bad))
    bad = copy.deepcopy(good)
    bad["spec"]["predictor"]["scaleMetric"] = "gpu"
    assert any("scaleMetric" in e for e in errors(validator, bad))
    bad = copy.deepcopy(good)
    bad["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    assert any("containerPort" in e for e in errors(validator, bad))


def test_bad_input_and_the_cli(registry, tmp_path):
    from typer.testing import CliRunner

    from modelpress.cli.main import app
    from modelpress.errors import ConfigError, ModelpressError
    from modelpress.scaleout.kserve import write_kserve_manifest

    with pytest.raises(ModelpressError, match="nosuch"):
        write_kserve_manifest("nosuch@production", tmp_path / "a")
    with pytest.raises(ConfigError, match="not a KServe scale metric"):
        write_kserve_manifest("enc@production", tmp_path / "b", scale_metric="gpu")
    with pytest.raises(ConfigError, match="Replicas must satisfy"):
        write_kserve_manifest("enc@production", tmp_path / "c", min_replicas=3, max_replicas=2)
    with pytest.raises(ConfigError, match="not a storage URI"):
        write_kserve_manifest("enc@production", tmp_path / "d", storage_uri="bucket/models")
    assert not any((tmp_path / x).exists() for x in "abcd")  # nothing half-written

    runner = CliRunner()
    r = runner.invoke(app, ["export", "enc@production", "--to", "kserve", str(tmp_path / "k"), "--min-replicas", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["version"] == "1"
    assert yaml.safe_load((tmp_path / "k" / "inferenceservice.yaml").read_text())["spec"]["predictor"]["minReplicas"] == 0
    r = runner.invoke(app, ["export", "enc@production", "--to", "kserve", str(tmp_path / "k")])
    assert r.exit_code == 2 and "already exists" in r.output and "--force" in r.output
    r = runner.invoke(app, ["export", "enc@nowhere", "--to", "kserve", str(tmp_path / "z")])
    assert r.exit_code == 2 and "stage" in r.output
