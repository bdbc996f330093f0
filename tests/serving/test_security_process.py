"""A real `modelpress serve` process without a key (issue 12): it generates a private key and prints it once, checks
the Host header on its loopback socket, local clients find the key, and SIGTERM drains, then exits 0."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from .conftest import text_request

SERVER_START_TIMEOUT_S = 120  # a fresh interpreter imports torch and loads one tiny model
EXIT_TIMEOUT_S = 60  # SIGTERM to exit: the drain of a few tiny requests


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_without_a_key_then_sigterm_drains_and_exits_0(tiny_encoder, tmp_path, monkeypatch):
    import httpx

    from modelpress.rollout.client import call

    from .._processes import popen_group

    home = tmp_path / "home"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MODELPRESS_HOME": str(home)}
    env.pop("MODELPRESS_API_KEY", None)
    cmd = [
        sys.executable,
        "-c",
        "from modelpress.cli import main; main()",
        "serve",
        str(tiny_encoder),
        "--port",
        str(port),
        "--threads",
        "1",
        "--log-level",
        "error",  # the generated key is printed even so (it was a WARNING log line, which this level hid)
    ]
    with open(log_path, "ab") as log:
        proc = popen_group(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready in time: {log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        key_file = home / "server.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert log_path.read_text().count(key) == 1  # printed once, at --log-level error too
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.post("/v2/repository/index").status_code == 401
            assert c.post("/v2/repository/index", headers={"x-api-key": key}).status_code == 200
            # DNS rebinding: a page of attacker.example resolving to 127.0.0.1 sends its own name as Host
            r = c.get("/v2/models", headers={"host": f"attacker.example:{port}"})
            assert r.status_code == 400
        monkeypatch.setenv("MODELPRESS_HOME", str(home))
        name = call("POST", url, "/v2/repository/index", None)[0]["name"]  # the CLI's client found the key itself

        statuses: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    try:
                        statuses.append(c.post(f"/v2/models/{name}/infer", json=text_request(["during shutdown"])).status_code)
                    except httpx.HTTPError:
                        return  # the socket closed: the server stopped accepting

        clients = [threading.Thread(target=traffic) for _ in range(4)]
        for t in clients:
            t.start()
        while len(statuses) < 20:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(EXIT_TIMEOUT_S)
        stop.set()
        for t in clients:
            t.join(30)
        assert rc == 0, log_path.read_text()[-3000:]
        assert statuses and set(statuses) <= {200, 503}, sorted(set(statuses))  # answered, or told it drains: never a 5xx failure
        assert "Traceback" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
