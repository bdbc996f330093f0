"""`modelpress serve DIR --tensor-parallel 2` (issue 15): a real server whose model is split over two worker
processes on 127.0.0.1 answers KServe v2 requests with the one-process model's outputs, and SIGTERM leaves no
worker behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from .conftest import text_request

START_TIMEOUT_S = 180  # a fresh interpreter imports torch, then starts and loads two worker processes
EXIT_TIMEOUT_S = 60
# the row-split layers sum in another order than one process: fp32 reorderings move outputs by about 1e-6
TOLERANCE = 1e-5
TEXTS = ["A man is playing a guitar.", "A dog runs across the field after a ball."]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_tensor_parallel_answers_as_one_process(tiny_encoder, tmp_path):
    import httpx
    import psutil

    import modelpress as mp

    from .._processes import popen_group, wait_ready

    art = mp.load(str(tiny_encoder))
    task = mp.task_for(art)
    batch = task.preprocess(TEXTS)
    expected = task.postprocess(mp.create_runner(art, "torch", threads=1).run(batch), batch)

    port, key = _free_port(), "tp-test-key"
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MODELPRESS_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-c", "from modelpress.cli import main; main()", "serve", str(tiny_encoder)]
    cmd += ["--port", str(port), "--api-key", key, "--tensor-parallel", "2", "--threads", "2", "--log-level", "error"]
    with open(log_path, "ab") as log:
        proc = popen_group(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(f"{url}/v2/health/ready", proc, START_TIMEOUT_S, log=log_path)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "python" in p.name()]
        assert len(workers) >= 2, [p.cmdline() for p in workers]  # the two ranks
        name = httpx.get(f"{url}/v2/models", headers={"x-api-key": key}, timeout=30).json()[0]["name"]
        r = httpx.post(f"{url}/v2/models/{name}/infer", json=text_request(TEXTS), headers={"x-api-key": key}, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        want = np.asarray(next(iter(expected.values())) if isinstance(expected, dict) else expected, dtype=np.float32)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOLERANCE
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(EXIT_TIMEOUT_S)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
