"""Run inside a fresh network and PID namespace (tests/scaleout/test_ray_serve.py starts it with unshare):
a Ray cluster of two nodes on 127.0.0.1, the model server deployed on it, driven through its one
HTTP endpoint. Prints one JSON line of what it saw; every Ray process dies with the namespace.

    python tests/scaleout/ray_cluster.py '{"port": 8123, "rollout": true}'
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

API_KEY = "ray-test-key-0123"
TEXTS = ["A man is playing a guitar.", "A woman is slicing an onion.", "Two dogs run on the beach.", "The stock market fell today."]
LOAD_CLIENTS = 8  # concurrent clients while scaling up: 4 per replica at 2 replicas, above target_ongoing_requests (2)
MAX_LOAD_REQUESTS = 4000  # the load phase stops here at the latest, whatever happened
SCALE_UP_LIMIT_S = 90.0
SCALE_DOWN_LIMIT_S = 45.0
DEPLOY_LIMIT_S = 120.0


def replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return status.deployments[deployment].replica_states.get("RUNNING", 0)


def kserve(texts: list[str]) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


def main(spec: dict[str, Any]) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    out: dict[str, Any] = {"timings": {}}
    t0 = time.monotonic()
    mark = lambda what: out["timings"].__setitem__(what, round(time.monotonic() - t0, 1))  # noqa: E731
    # Cluster() writes the head's address to <system temp>/ray/ray_current_cluster whatever temp_dir says, and never
    # creates that folder: on a machine where no Ray ran before (or `ray stop` removed it) the head failed to start.
    os.makedirs(os.path.join(tempfile.gettempdir(), "ray"), exist_ok=True)
    temp = tempfile.mkdtemp(prefix="mpray", dir="/tmp")  # short: Ray's socket paths must stay under 107 characters
    # one logical CPU per node and one per replica: two replicas cannot share a node; the head's is the first replica's
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "temp_dir": temp})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    mark("head")

    port = spec["port"]
    base = f"http://127.0.0.1:{port}"
    app, dep = "modelpress.minilm.v1", "minilm-v1"
    options = Path(temp) / "ray.yaml"  # what the flags do not cover: fast autoscaling decisions, one proxy, the ingress's CPUs
    options.write_text(
        "autoscaling: {metrics_interval_s: 0.5, look_back_period_s: 2}\n"
        "ingress_cpus: 0\n"
        "proxy_location: HeadOnly  # one HTTP endpoint: both nodes share this host's port space\n"
    )
    command = [
        str(Path(sys.executable).with_name("modelpress")), "serve", "minilm", "--backend", "ray", "--ray-address", cluster.address,
        "--ray-options", str(options), "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "2",
        "--upscale-delay", "0", "--downscale-delay", "2s", "--replica-cpus", "1",
        "--port", str(port), "--api-key", API_KEY, "--max-batch-size", "8", "--max-queue-delay-ms", "2", "--log-level", "warning",
    ]  # fmt: skip
    log_path = Path(temp) / "serve.log"  # a file, not a pipe nobody reads while the test runs
    with log_path.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        cluster.add_node(num_cpus=1)  # the second node joins while the first replica loads
        out["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        mark("second_node")
        deadline = time.monotonic() + DEPLOY_LIMIT_S
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            server.kill()
            server.wait()
            raise RuntimeError(f"modelpress serve --backend ray did not get ready: {log_path.read_text()[-3000:]}")
        mark("deployed")
        out["applications"] = applications()
        scenario(out, base, app, dep, mark, rollout_too=spec.get("rollout", False), reload_too=spec.get("reload", False))
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)  # what Ctrl-C does: the service's applications are deleted
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    out["serve_exit"] = server.returncode
    out["serve_log"] = log_path.read_text()[-2000:]
    time.sleep(1.0)
    out["applications_after_exit"] = applications()
    ray.shutdown()
    cluster.shutdown()
    mark("shutdown")
    return out


def applications() -> list[str]:
    from ray import serve

    apps = serve.status().applications
    return sorted(name for name, status in apps.items() if status.status != "DELETING")


def scenario(out: dict[str, Any], base: str, app: str, dep: str, mark: Any, *, rollout_too: bool, reload_too: bool = False) -> None:
    with httpx.Client(base_url=base, timeout=60) as client:
        # every protocol through the one endpoint
        kv = client.post("/v2/models/minilm/infer", json=kserve(TEXTS[:1]))
        oa = client.post("/v1/embeddings", json={"model": "minilm", "input": TEXTS[:1]})
        sm = client.post("/invocations", json={"inputs": TEXTS[:1]}, headers={"X-Amzn-SageMaker-Target-Model": "minilm"})
        out["protocols"] = {
            "kserve_v2": [kv.status_code, kv.json()["outputs"][0]["data"][:8] if kv.status_code == 200 else kv.text],
            "openai": [oa.status_code, oa.json()["data"][0]["embedding"][:8] if oa.status_code == 200 else oa.text],
            "sagemaker": [sm.status_code, sm.json()["embeddings"][0][:8] if sm.status_code == 200 else sm.text],
        }
        bad = client.post("/v2/models/minilm/infer", json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [7]}]})
        out["bad_input"] = [bad.status_code, bad.text[:300]]
        out["replicas_before"] = replicas(app, dep)

        # load until a second replica serves (both nodes answer), bounded in time and requests
        answered: dict[str, int] = {}
        sent = [0]
        stop = threading.Event()
        lock = threading.Lock()

        def client_loop() -> None:
            with httpx.Client(base_url=base, timeout=60) as c:
                while not stop.is_set():
                    with lock:
                        if sent[0] >= MAX_LOAD_REQUESTS:
                            return
                        sent[0] += 1
                    r = c.post("/v2/models/minilm/infer", json=kserve(TEXTS))
                    if r.status_code == 200:
                        node = r.headers.get("x-modelpress-node", "?")
                        with lock:
                            answered[node] = answered.get(node, 0) + 1

        started = time.monotonic()
        peak = out["replicas_before"]
        with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
            futures = [pool.submit(client_loop) for _ in range(LOAD_CLIENTS)]
            while time.monotonic() - started < SCALE_UP_LIMIT_S and not all(f.done() for f in futures):
                peak = max(peak, replicas(app, dep))
                with lock:
                    both = len(answered) >= 2
                if peak >= 2 and both:
                    time.sleep(1.0)  # a little traffic on both replicas
                    break
                time.sleep(0.25)
            stop.set()
        out["scale_up"] = {"peak_replicas": peak, "seconds": round(time.monotonic() - started, 1), "requests": sent[0]}
        out["answered_by_node"] = answered
        mark("scaled_up")

        # idle: back down to min_replicas
        started = time.monotonic()
        while time.monotonic() - started < SCALE_DOWN_LIMIT_S and replicas(app, dep) > 1:
            time.sleep(0.5)
        out["scale_down"] = {"replicas": replicas(app, dep), "seconds": round(time.monotonic() - started, 1)}
        mark("scaled_down")

        if rollout_too:
            out["rollout"] = rollout(client)
            out["applications_after_rollout"] = applications()
            mark("rollout")
            out["canary"] = canary(client)
            mark("canary")
        if reload_too:  # run by hand (another replica load): a reload of the serving label keeps its application
            loaded = client.post("/v2/repository/models/minilm/load", json={}, headers={"X-API-Key": API_KEY})
            time.sleep(1.0)
            answer = client.post("/v2/models/minilm/infer", json=kserve(TEXTS[:1]))
            out["reload"] = {"load": [loaded.status_code, loaded.text[:300]], "infer": answer.status_code, "apps": applications()}
            mark("reload")


def rollout(client: httpx.Client) -> dict[str, Any]:
    """An A/B split with a second version (deployed by the rollout controller), then its abort (the version retired)."""
    keys = {"X-API-Key": API_KEY}
    spec = {"candidate": "2", "source": "minilm", "strategy": "ab", "steps": [50], "window_s": 3600, "promote": False}
    started = client.post("/rollouts/minilm/start", json=spec, headers=keys)
    result: dict[str, Any] = {"start": [started.status_code, started.text[:300]]}
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = client.get("/rollouts/minilm", headers=keys).json()
        if status.get("status") != "loading":
            break
        time.sleep(0.5)
    result["status"] = status.get("status")
    versions: dict[str, int] = {}
    for i in range(40):
        r = client.post("/v2/models/minilm/infer", json=kserve(TEXTS[:1]), headers={"x-user-id": f"user-{i}"})
        if r.status_code == 200:
            v = r.json()["model_version"]
            versions[v] = versions.get(v, 0) + 1
    result["versions_answered"] = versions
    aborted = client.post("/rollouts/minilm/abort", json={"why": "test over"}, headers=keys)
    result["abort"] = aborted.status_code
    time.sleep(1.0)
    result["served_after_abort"] = sorted(m["version"] for m in client.get("/v2/models").json())
    return result


FINAL = ("succeeded", "rolled_back", "aborted", "failed")
CANARY_LIMIT_S = 120.0  # a shadow window and two canary windows of 2 s each, with replicas loading on 2 shared cores


def canary(client: httpx.Client) -> dict[str, Any]:
    """Shadow, then a canary at 50% and 100%, decided by the controller on live numbers (shadow
    agreement, error rate), ending with the candidate serving everything: the rollout controller
    running in the Ray ingress exactly as in the local server."""
    keys = {"X-API-Key": API_KEY}
    spec = {
        "candidate": "2",
        "source": "minilm",
        "strategy": "shadow-then-canary",
        "steps": [50, 100],
        "window_s": 2,
        "min_requests": 5,
        "max_p99_ratio": None,  # two shared cores: latency ratios are noise here; agreement and errors decide
        "promote": False,
    }
    started = client.post("/rollouts/minilm/start", json=spec, headers=keys)
    result: dict[str, Any] = {"start": [started.status_code, started.text[:300]]}
    status: dict[str, Any] = {}
    deadline, i = time.monotonic() + CANARY_LIMIT_S, 0
    while time.monotonic() < deadline:
        for _ in range(8):
            client.post("/v2/models/minilm/infer", json=kserve(TEXTS[i % len(TEXTS) : i % len(TEXTS) + 1]), headers={"x-user-id": f"u{i}"})
            i += 1
        status = client.get("/rollouts/minilm", headers=keys).json()
        if status.get("status") in FINAL:
            break
    result["status"] = status.get("status")
    result["requests"] = i
    answered = {client.post("/v2/models/minilm/infer", json=kserve(TEXTS[:1])).json().get("model_version") for _ in range(5)}
    result["answered_after"] = sorted(str(v) for v in answered)
    result["events"] = [e.get("action") or e.get("kind") for e in status.get("events", [])][-8:]
    return result


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
