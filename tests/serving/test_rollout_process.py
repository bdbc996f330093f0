"""Rollouts against a server in its own process or thread: a SIGKILL mid-canary, and the rollout CLI."""

from __future__ import annotations

import json
import time

import pytest

from modelpress.errors import ConfigError
from modelpress.rollout.spec import ACTIVE
from modelpress.serving.config import ModelConfig

from .._processes import wait_ready
from .conftest import make_server, registry_at, text_request

KEY = "test-key-123456"
AUTH = {"x-api-key": KEY}
ROLLOUT_TIMEOUT_S = 60  # a rollout of 0.2-1.5 s windows ends in seconds; this only bounds a hung one


# -- a real process killed mid-canary ---------------------------------------------------------
SERVER_START_TIMEOUT_S = 120  # a fresh interpreter imports torch and loads two tiny models


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_server(registry_url: str, port: int, log_path):
    import os
    import subprocess
    import sys

    from .._processes import popen_group

    cmd = [
        sys.executable,
        "-c",
        "from modelpress.cli import main; main()",
        "serve",
        "tiny-enc@production",
        "--registry",
        registry_url,
        "--port",
        str(port),
        "--api-key",
        KEY,
        "--threads",
        "1",
        "--log-level",
        "warning",
    ]
    with open(log_path, "ab") as log:
        # its own session: kill() ends the server's whole group
        return popen_group(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_sigkill_mid_canary_then_restart_resumes_at_the_same_step_with_the_same_weights(registry_url, tmp_path):
    import threading

    import httpx

    port = _free_port()
    url, log_path = f"http://127.0.0.1:{port}", tmp_path / "server.log"
    proc = _spawn_server(registry_url, port, log_path)
    try:
        wait_ready(f"{url}/v2/health/ready", proc, SERVER_START_TIMEOUT_S, interval=0.1, log=log_path)
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    try:
                        c.post("/v2/models/tiny-enc/infer", json=text_request(["steady traffic"]))
                    except httpx.HTTPError:  # the server is SIGKILLed mid-request: expected, traffic ends
                        return

        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            # This test is about resuming, not about the SLO checks: the thresholds are loose so a
            # loaded machine's latency spikes cannot roll the canary back before the kill.
            spec = {
                "candidate": "2",
                "steps": [10, 40, 100],
                "window_s": 1.5,
                "min_requests": 3,
                "max_p99_ratio": 1000.0,
                "max_error_rate": 0.5,
            }
            assert c.post("/rollouts/tiny-enc/start", json=spec).status_code == 201
            senders = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
            for t in senders:
                t.start()
            deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
            while (status := c.get("/rollouts/tiny-enc").json())["step"] != 1:
                assert time.monotonic() < deadline and status["status"] in ("loading", "running"), status
                time.sleep(0.05)
            proc.kill()  # SIGKILL, a fraction of a second into the second step's 1.5 s window
            proc.wait(30)
            stop.set()
            for t in senders:
                t.join(30)
        assert status["weights"] == {"2": 40.0, "1": 60.0}
        proc = _spawn_server(registry_url, port, log_path)
        wait_ready(f"{url}/v2/health/ready", proc, SERVER_START_TIMEOUT_S, interval=0.1, log=log_path)
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            after = c.get("/rollouts/tiny-enc").json()
            served = c.get("/v2/models/tiny-enc").json()
        assert after["status"] == "running" and after["step"] == 1 and after["weights"] == status["weights"]
        assert served["parameters"]["policy"] == status["policy"] and served["versions"] == ["1", "2"]
        assert [e["action"] for e in after["events"]][-1] == "resume"
    finally:
        proc.kill()
        proc.wait(30)


def test_rollout_cli_against_a_running_server(registry_url):
    import httpx
    from typer.testing import CliRunner

    from modelpress.cli import app
    from modelpress.cli.rollout import parse_duration, parse_rate, parse_steps

    assert (parse_duration("200ms"), parse_duration("60s"), parse_duration("5m"), parse_duration("0.5")) == (0.2, 60.0, 300.0, 0.5)
    assert (parse_rate("1%"), parse_rate("0.02"), parse_steps("5,25,50,100")) == (0.01, 0.02, [5.0, 25.0, 50.0, 100.0])
    for fn, bad, message in (
        (parse_duration, "soon", "not a duration"),
        (parse_rate, "150%", "between 0 and 100%"),
        (parse_steps, "5,x", "percentages"),
    ):
        with pytest.raises(ConfigError, match=message):
            fn(bad)
    cli = CliRunner()
    server = make_server(registry=registry_url, api_key=KEY, models=[ModelConfig(source="tiny-enc@production", threads=1)])
    with server.in_thread() as running:
        base = ["--url", running.url, "--api-key", KEY]
        r = cli.invoke(
            app,
            [
                "rollout",
                "start",
                "tiny-enc",
                "--candidate",
                "2",
                "--strategy",
                "canary",
                "--steps",
                "50,100",
                "--window",
                "200ms",
                "--max-error-rate",
                "1%",
                "--max-p99-ratio",
                "5",
                "--min-agreement",
                "0.99",
                "--min-requests",
                "3",
                *base,
            ],
        )
        assert r.exit_code == 0 and "canary rollout 1 -> 2 is loading" in r.output and "step 1/2" in r.output, r.output
        assert "version 2 is loading; the first step begins once it is ready" in r.output, r.output
        with httpx.Client(base_url=running.url, timeout=30) as c:
            deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
            while True:
                c.post("/v2/models/tiny-enc/infer", json=text_request(["cli traffic"]))
                doc = json.loads(cli.invoke(app, ["rollout", "status", "tiny-enc", "--json", *base]).output)
                if doc["status"] not in ACTIVE:
                    break
                assert time.monotonic() < deadline, doc
        assert doc["status"] == "succeeded" and doc["promoted"] == "tiny-enc:2"
        r = cli.invoke(app, ["rollout", "report", "tiny-enc", *base])
        assert r.exit_code == 0 and "error_rate" in r.output and "significant" in r.output.lower() and "p99 ms" in r.output, r.output
        r = cli.invoke(app, ["rollback", "tiny-enc", "--why", "cli test", *base])
        assert r.exit_code == 0 and "now serves version 1; the registry has tiny-enc:1 in production again" in r.output, r.output
        r = cli.invoke(app, ["rollout", "status", "nope", *base])
        assert r.exit_code == 2 and "No rollout of 'nope'" in r.output
        r = cli.invoke(app, ["rollout", "pause", "tiny-enc", "--url", running.url, "--api-key", "wrong-key-00000"])
        assert r.exit_code == 2 and "API key" in r.output
    r = cli.invoke(app, ["rollback", "tiny-enc", "--url", "http://127.0.0.1:9", "--api-key", KEY])
    assert r.exit_code == 2 and "Cannot reach the modelpress server" in r.output and "registry rollback" in r.output
    with registry_at(registry_url) as reg:
        assert reg.get("tiny-enc@production").version == 1
