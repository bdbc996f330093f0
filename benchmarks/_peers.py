"""The serving benchmark's peers: LitServe and Ray Serve running the same runner, in their own environment.

They are installed into the benchmark's own virtual environment (``$MODELPRESS_BENCH_CACHE/peers``
or ``~/.cache/modelpress-bench/peers``, never the project's) and started through ``_procs.Procs``:
each in a session of its own, ended as a group when the benchmark ends; the Ray cluster keeps its
files under the benchmark's temporary folder and is shut down with ``ray stop``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _loadgen import free_port, run_load
from _procs import Procs

ROOT = Path(__file__).resolve().parent.parent
PEER_VERSIONS = {"litserve": "litserve==0.2.19", "ray": "ray[serve]==2.60.0"}
PEER_DIR = Path(os.environ.get("MODELPRESS_BENCH_CACHE", Path.home() / ".cache/modelpress-bench")) / "peers"
READY_TIMEOUT_S = float(os.environ.get("BENCH_PEER_TIMEOUT", "600"))
# Set to the server's name in the environment of each server the serving benchmark starts: its processes
# inherit it (Ray's daemons and workers too), so its CPU is read off every process it runs (_cpu.ProcessTree).
SERVER_ENV = "MODELPRESS_BENCH_SERVER"

LITSERVE_APP = """
import sys, litserve as ls, numpy as np, modelpress as mp
class API(ls.LitAPI):
    def setup(self, device):
        art = mp.load("minilm"); self.task = mp.task_for(art)
        self.runner = mp.create_runner(art, "{runtime}", threads={threads}).load()
    def decode_request(self, request):
        return request["input"]
    def predict(self, texts):
        batch = self.task.preprocess(list(texts))
        return list(self.task.postprocess(self.runner.run(batch), batch))
    def encode_response(self, emb):
        return {{"embedding": emb.tolist()}}
if __name__ == "__main__":
    api = API(max_batch_size={max_batch}, batch_timeout={delay_s})
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=int(sys.argv[1]), generate_client_file=False)
"""

RAY_APP = """
import sys, time, modelpress as mp, ray
from ray import serve
from starlette.requests import Request
@serve.deployment(max_ongoing_requests=256)
class Embed:
    def __init__(self):
        art = mp.load("minilm"); self.task = mp.task_for(art)
        self.runner = mp.create_runner(art, "{runtime}", threads={threads}).load()
    @serve.batch(max_batch_size={max_batch}, batch_wait_timeout_s={delay_s})
    async def embed(self, texts):
        batch = self.task.preprocess(list(texts))
        return [e.tolist() for e in self.task.postprocess(self.runner.run(batch), batch)]
    async def __call__(self, request: Request):
        return {{"embedding": await self.embed((await request.json())["input"])}}
if __name__ == "__main__":
    # the cluster's files under the benchmark's temporary folder: `ray stop` and the process groups end its processes
    ray.init(num_cpus={threads}, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=sys.argv[2])
    serve.start(http_options={{"host": "127.0.0.1", "port": int(sys.argv[1])}})
    serve.run(Embed.bind(), route_prefix="/predict")
    print("ready", flush=True)
    while True:
        time.sleep(3600)
"""


def peer_python(peers: list[str]) -> Path:
    """The peers' own virtual environment: LitServe / Ray Serve there; torch and modelpress read from this one."""
    venv = PEER_DIR / "venv"
    py = venv / "bin/python"
    if not py.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
    site = next((venv / "lib").glob("python3*/site-packages"))
    # torch, transformers and modelpress come from the project's environment (read only, listed after the venv's own packages)
    here_site = [p for p in sys.path if p.endswith("site-packages")]
    (site / "modelpress_project.pth").write_text("\n".join([str(ROOT / "src"), *here_site]) + "\n")
    missing = [PEER_VERSIONS[p] for p in peers if not installed(py, p)]
    if missing:
        print(f"installing {', '.join(missing)} into {venv} (first run only)", flush=True)
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *missing])
    return py


def installed(py: Path, peer: str) -> bool:
    """Whether ``peer`` imports in the environment of ``py``."""
    return py.exists() and subprocess.call([str(py), "-c", f"import {peer}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0


def start_peer(
    peer: str, py: Path, settings: dict, tmp: Path, procs: Procs, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, int]:
    """Start ``peer`` serving the runner on a free port (owned by ``procs``); returns once it answers a request."""
    port = free_port()
    template = LITSERVE_APP if peer == "litserve" else RAY_APP
    script = tmp / f"{peer}_app.py"
    script.write_text(
        template.format(
            runtime=settings["runtime"], threads=settings["threads"], max_batch=settings["max_batch"], delay_s=settings["delay_ms"] / 1000
        )
    )
    cmd = [str(py), str(script), str(port)]
    on_stop = None
    if peer == "ray":
        (tmp / "ray").mkdir(exist_ok=True)
        cmd.append(str(tmp / "ray"))
        # the `ray` command of the venv that has Ray: the peers' own, or the project's (read through the .pth file)
        ray_cli = next((c for c in (py.parent / "ray", Path(sys.executable).parent / "ray") if c.exists()), py.parent / "ray")
        on_stop = procs.ray_stopper(str(ray_cli))
    log_path = tmp / f"{peer}.log"
    with open(log_path, "wb") as log:
        proc = procs.popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**(extra_env or {}), "RAY_USAGE_STATS_ENABLED": "0", SERVER_ENV: peer},
            on_stop=on_stop,
        )
    body = json.dumps({"input": "warm up"}).encode()
    deadline = time.time() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{peer} exited with {proc.returncode} before it was ready: {log_path.read_text()[-2000:]}")
        try:
            if run_load(port, "/predict", [body], 1)["statuses"].get(200):
                return proc, port
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{peer} was not ready within {READY_TIMEOUT_S:.0f} s: {log_path.read_text()[-2000:]}")
        time.sleep(1)
