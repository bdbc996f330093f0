"""Alert rules: Prometheus rule-file schema, metric names a live server really exposes, expressions that parse."""

from __future__ import annotations

import re

import pytest
import yaml

from modelpress.errors import ConfigError
from modelpress.rollout.alerts import AlertThresholds, alert_rules
from modelpress.serving.config import BatchConfig, ModelConfig, ServerConfig

from .conftest import client_for, make_server, text_request
from .rollout_support import load_version

RULE_KEYS = {"alert", "expr", "for", "labels", "annotations"}
FUNCTIONS = {"rate", "histogram_quantile", "sum", "max", "min", "avg"}  # what the rules may call
KEYWORDS = {"by", "without", "on", "ignoring", "and", "or", "unless", "bool"}
DURATION = re.compile(r"^[0-9]+(ms|s|m|h|d)$")


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def _selectors(expr: str) -> list[str]:
    """Metric names of every vector selector: from the PromQL parser's AST when it is installed, else
    identifiers followed by '{' (every selector the rules write has labels)."""
    try:
        import promql_parser
    except ImportError:
        return re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", _strip_strings(expr))
    names: list[str] = []
    promql_parser.walk(
        promql_parser.parse(expr),
        pre_visit=lambda node: names.append(node.name) if isinstance(node, promql_parser.VectorSelector) else None,
    )
    return names


def _check_parses(expr: str) -> None:
    """Balanced brackets, only known functions, range selectors with a duration, a comparison at the top."""
    text = _strip_strings(expr)
    pairs = {")": "(", "}": "{", "]": "["}
    stack: list[str] = []
    for ch in text:
        if ch in "({[":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack[-1] == pairs[ch], f"unbalanced {ch!r} in {expr}"
            stack.pop()
    assert not stack, f"unclosed {stack} in {expr}"
    for name in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*\(", text):
        assert name in FUNCTIONS | KEYWORDS, f"unknown function {name} in {expr}"
    for rng in re.findall(r"\[([^\]]*)\]", text):
        assert DURATION.match(rng), f"bad range [{rng}] in {expr}"
    assert re.search(r"[<>]=?\s*[0-9.e+-]+\s*$", text), f"no threshold comparison at the end of {expr}"
    try:
        import promql_parser  # the Prometheus parser (Rust, promql-parser on PyPI), when installed
    except ImportError:
        return
    tree = promql_parser.parse(expr)  # raises ValueError on invalid PromQL
    assert type(tree).__name__ == "BinaryExpr", f"{expr} is not a comparison"


def test_rules_have_the_prometheus_schema_and_the_thresholds():
    cfg = ServerConfig(
        models=[ModelConfig(source="minilm", name="emb", batching=BatchConfig(max_queue_size=64)), ModelConfig(source="x/clf")]
    )
    rules = yaml.safe_load(yaml.safe_dump(alert_rules(cfg, {"max_error_rate": 0.02, "max_p99_s": 0.25, "for_": "2m"})))
    assert set(rules) == {"groups"} and [g["name"] for g in rules["groups"]] == ["modelpress-emb", "modelpress-clf"]
    for g in rules["groups"]:
        assert set(g) == {"name", "rules"}
        assert [r["alert"] for r in g["rules"]] == [
            "ModelpressHighErrorRate",
            "ModelpressHighP99Latency",
            "ModelpressQueueSaturated",
            "ModelpressShadowDisagreement",
        ]
        for r in g["rules"]:
            assert set(r) == RULE_KEYS and r["for"] == "2m" and DURATION.match(r["for"])
            assert set(r["annotations"]) == {"summary", "description"} and r["labels"]["severity"] == "page"
            _check_parses(r["expr"])
    emb = {r["alert"]: r["expr"] for r in rules["groups"][0]["rules"]}
    assert emb["ModelpressHighErrorRate"].endswith("> 0.02") and 'model="emb"' in emb["ModelpressHighErrorRate"]
    assert emb["ModelpressHighP99Latency"].startswith("histogram_quantile(0.99, sum by (le, model, version)") and emb[
        "ModelpressHighP99Latency"
    ].endswith("> 0.25")
    assert "/ 64 > 0.8" in emb["ModelpressQueueSaturated"]  # the model's own max_queue_size
    assert "/ 1024 " in rules["groups"][1]["rules"][2]["expr"]  # the default one


def test_the_checks_catch_broken_expressions():
    for bad in [
        'rate(modelpress_requests_total{model="m"}[5m] > 1',
        'frobnicate(modelpress_queue_depth{model="m"}) > 1',
        'rate(x{a="b"}[five]) > 1',
    ]:
        with pytest.raises((AssertionError, ValueError)):
            _check_parses(bad)


def test_bad_thresholds_and_no_models_are_refused():
    with pytest.raises(ConfigError, match="max_error_rate"):
        AlertThresholds(max_error_rate=5)
    with pytest.raises(ConfigError, match="Prometheus duration"):
        AlertThresholds(for_="five minutes")
    with pytest.raises(ConfigError, match="No model"):
        alert_rules([])


@pytest.mark.anyio
async def test_every_metric_in_the_rules_is_one_the_running_server_exposes(tiny_encoder):
    """Serve a tiny model, run plain and shadow traffic, scrape /metrics: every name the rules read is there."""
    from modelpress.rollout.routing import ShadowPolicy

    server = make_server(models=[ModelConfig(source=str(tiny_encoder), name="tiny", threads=1)])
    async with client_for(server) as c:
        await load_version(server, str(tiny_encoder), "tiny", "2")
        server.repository.routers["tiny"].set_policy(ShadowPolicy("1", "2", fraction=1.0))
        for i in range(5):
            assert (await c.post("/v2/models/tiny/infer", json=text_request([f"hello {i}"]))).status_code == 200
        await server.mirror.wait(10)
        body = (await c.get("/metrics")).text
    exposed = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line and not line.startswith("#")}
    used = {name for g in alert_rules(["tiny"])["groups"] for r in g["rules"] for name in _selectors(r["expr"])}
    assert len(used) >= 5, used
    assert used <= exposed, f"not on /metrics: {sorted(used - exposed)}"
    assert 'modelpress_shadow_agreement_count{model="tiny",version="2"} 5.0' in body  # the mirrored copies were counted


def test_cli_writes_rules_from_a_config(tmp_path):
    from typer.testing import CliRunner

    from modelpress.cli import app

    cfg = tmp_path / "serve.yaml"
    cfg.write_text("models:\n  - {source: minilm, name: emb, batching: {max_queue_size: 32}}\n")
    out = tmp_path / "rules.yaml"
    r = CliRunner().invoke(app, ["alerts", "--config", str(cfg), "extra", "-o", str(out), "--max-p99", "200ms"])
    assert r.exit_code == 0, r.output
    rules = yaml.safe_load(out.read_text())
    assert [g["name"] for g in rules["groups"]] == ["modelpress-emb", "modelpress-extra"]
    assert rules["groups"][0]["rules"][1]["expr"].endswith("> 0.2") and "/ 32 >" in rules["groups"][0]["rules"][2]["expr"]
    r = CliRunner().invoke(app, ["alerts", "--max-error-rate", "150%", "emb"])
    assert r.exit_code != 0 and "between 0 and 100%" in r.output
