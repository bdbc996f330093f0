"""``ship``: optimize with the gate, register, load production, shadow then canary to production under load."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from modelpress.errors import GateFailedError

from .conftest import text_request

KEY = "ship-test-key-1234"
WINDOW_S = 0.3  # short analysis windows: the whole rollout takes a few seconds
START_TIMEOUT_S = 30
SERVED_TIMEOUT_S = 300  # the clients wait this long for ship to have the model served (it optimizes first)
INT8_RECIPE = {
    "gate": {"spearman": {"min_value": -1.0}},
    "steps": [{"technique": "dynamic-int8", "runtime": "onnxruntime", "fuse": False}],
}  # a random tiny model: its Spearman means nothing
# int8 weights and the shadow copies (run after the primary answered, on the same 2 cores) are
# slower and less similar than a real candidate would be; these bounds only catch a broken rollout
ROLLOUT = {"max_error_rate": 0.0, "max_p99_ratio": 10.0, "min_agreement": 0.9, "min_requests": 5}


def _pairs_file(tmp_path):
    words = ["the cat sat", "a dog ran", "birds sing loudly", "rain falls today", "the sun is warm", "children play outside"]
    rows = ["sentence1,sentence2,score"] + [f"{words[i % 6]} {i},{words[(i + 1) % 6]} {i},{(i % 6) * 1.0}" for i in range(30)]
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@contextlib.contextmanager
def live_server(**settings: Any) -> Iterator[str]:
    """A real ModelServer behind uvicorn on a loopback socket, in a thread; yields its URL."""
    from modelpress.rollout import RolloutServer
    from modelpress.serving.app import _uvicorn_server
    from modelpress.serving.config import ServerConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServerConfig(access_log=False, port=port, log_level="warning", **settings)
    server = RolloutServer(cfg)
    uv = _uvicorn_server(server, cfg, lifespan="on")
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def steady_clients(url: str, model: str, clients: int = 3) -> Iterator[dict[str, list]]:
    """Threads sending one-text requests as soon as ``model`` is served, until the block ends."""
    import httpx

    seen: dict[str, list] = {"statuses": [], "versions": [], "errors": []}
    stop = threading.Event()

    def one(c: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + SERVED_TIMEOUT_S
            while not stop.is_set() and client.get(f"/v2/models/{model}/ready").status_code != 200:
                if time.monotonic() > deadline:
                    seen["errors"].append(f"{model} was not served within {SERVED_TIMEOUT_S} s")
                    return
                time.sleep(0.02)
            i = 0
            while not stop.is_set():
                i += 1
                r = client.post(f"/v2/models/{model}/infer", json=text_request([f"client {c} says hello {i}"]))
                seen["statuses"].append(r.status_code)
                seen["versions"].append(r.json().get("model_version") if r.status_code == 200 else None)
                if r.status_code != 200:
                    seen["errors"].append(r.text[:200])
                time.sleep(0.005)  # leave the 2 cores some room for the shadow copies and the optimizer

    threads = [threading.Thread(target=one, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    try:
        yield seen
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def test_ship_promotes_an_int8_variant_under_load_with_zero_failed_requests(tiny_encoder, tmp_path):
    from modelpress.registry.api import Registry
    from modelpress.ship import ship

    reg_url = str(tmp_path / "reg.db")
    decisions: list[dict[str, Any]] = []
    with live_server(registry=reg_url, api_key=KEY) as url, steady_clients(url, "tiny") as seen:
        res = ship(
            "tiny",
            str(tiny_encoder),
            recipe=INT8_RECIPE,
            steps=[25, 100],
            window_s=WINDOW_S,
            url=url,
            api_key=KEY,
            registry=reg_url,
            output=tmp_path / "out",
            data=str(_pairs_file(tmp_path)),
            task="embedding",
            rollout=ROLLOUT,
            timeout_s=60,
            on_event=decisions.append,
        )
        n_at_end = len(seen["statuses"])
        deadline = time.monotonic() + 10
        while len(seen["statuses"]) < n_at_end + 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert res.ok and res.status == "promoted", (res.status, res.rollout.get("reason"), res.decisions)
    assert (res.baseline_ref, res.candidate_ref, res.candidate_runtime) == ("tiny:1", "tiny:2", "onnxruntime")
    actions = [d["action"] for d in decisions]
    assert actions[0] == "start" and actions[-1] == "promote" and actions.count("advance") >= 2, actions  # shadow -> 25 % -> 100 %
    assert decisions == res.decisions
    assert seen["errors"] == [] and len(seen["statuses"]) > 50
    assert set(seen["versions"]) == {"1", "2"} and seen["versions"][-1] == "2"
    with Registry(reg_url) as reg:
        assert reg.get("tiny@production").version == 2
        first_production = next(h for h in reg.get("tiny:1").stage_history if h["to"] == "production")
        assert first_production["who"] == "modelpress-ship"  # the original was made production before the rollout


def test_a_gate_that_cannot_pass_stops_before_any_rollout(tiny_encoder, tmp_path):
    import httpx

    from modelpress.ship import ship

    reg_url = str(tmp_path / "reg.db")
    recipe = {**INT8_RECIPE, "gate": {"mean_cosine": {"min_value": 1.5}}}  # cosine never exceeds 1
    with live_server(registry=reg_url, api_key=KEY) as url:
        with pytest.raises(GateFailedError, match="Stopping before any rollout"):
            ship(
                "tiny",
                str(tiny_encoder),
                recipe=recipe,
                window_s=WINDOW_S,
                url=url,
                api_key=KEY,
                registry=reg_url,
                output=tmp_path / "out",
                data=str(_pairs_file(tmp_path)),
                task="embedding",
            )
        assert httpx.get(f"{url}/v2/models/tiny").status_code == 404  # nothing was loaded
        assert httpx.get(f"{url}/rollouts", headers={"x-api-key": KEY}).json() in ({}, [], {"rollouts": {}})


def test_cli_exits_non_zero_on_a_gate_failure(tiny_encoder, tmp_path):
    import json

    from typer.testing import CliRunner

    from modelpress.cli import app

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({**INT8_RECIPE, "gate": {"mean_cosine": {"min_value": 1.5}}}))
    r = CliRunner().invoke(
        app,
        [
            "ship",
            "tiny",
            "--from",
            str(tiny_encoder),
            "--recipe",
            str(recipe),
            "--data",
            str(_pairs_file(tmp_path)),
            "--registry",
            str(tmp_path / "reg.db"),
            "-o",
            str(tmp_path / "out"),
            "--url",
            "http://127.0.0.1:9",
        ],
    )
    assert r.exit_code == GateFailedError.exit_code, r.output
    assert "Stopping before any rollout" in r.output


def test_a_breached_window_rolls_back_and_production_stays(tiny_encoder, tmp_path):
    from modelpress.registry.api import Registry
    from modelpress.ship import ship

    reg_url = str(tmp_path / "reg.db")
    strict = {**ROLLOUT, "max_p99_ratio": 0.01}  # no candidate answers 100x faster than its baseline: the first window breaches
    with live_server(registry=reg_url, api_key=KEY) as url, steady_clients(url, "tiny") as seen:
        res = ship(
            "tiny",
            str(tiny_encoder),
            recipe=INT8_RECIPE,
            steps=[25, 100],
            window_s=WINDOW_S,
            url=url,
            api_key=KEY,
            registry=reg_url,
            output=tmp_path / "out",
            data=str(_pairs_file(tmp_path)),
            task="embedding",
            rollout=strict,
            timeout_s=60,
        )
    assert not res.ok and res.status == "rolled_back", res.status
    assert [d["action"] for d in res.decisions][-1] == "rollback" and "p99" in "; ".join(res.decisions[-1]["reasons"])
    assert seen["errors"] == [] and set(seen["versions"]) == {"1"}  # shadow only: no client was answered by the candidate
    with Registry(reg_url) as reg:
        assert reg.get("tiny@production").version == 1
