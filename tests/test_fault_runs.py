"""Fault runs (issue 12, item 6): real ``modelpress`` processes SIGKILLed at several points of
``registry register``, ``optimize`` and ``tune``; afterwards ``modelpress registry check``
passes, the caches hold no half-written entry that a later run would read, and the next run
resumes or starts clean.

The kill points are named hooks (``MODELPRESS_TEST_CRASH_AT``, :func:`modelpress._fs.crash_point`):
the process kills itself there, or (with ``MODELPRESS_TEST_CRASH_PAUSE``) stops there and the
test kills it from outside after a delay, in the middle of whatever it does next. Every child
runs in a process group of its own (tests/_processes.py), so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests._processes import popen_group

from modelpress._fs import CRASH_ENV, CRASH_MARK_ENV, CRASH_PAUSE_ENV
from modelpress.artifacts import Artifact, Manifest, Signature, TensorSpec

CLI = [sys.executable, "-c", "from modelpress.cli.main import main; main()"]
RUN_TIMEOUT_S = 300  # a tiny model's optimize or tune on a loaded 2-core machine; only bounds a hung child
PAUSE_TIMEOUT_S = 240  # until the child reaches its kill point

TINY_RECIPE = """\
name: tiny
task: embedding
data: stsb-dev
mode: branch
on_failure: skip
gate:
  spearman: {min_recovery: 0.01}   # a random tiny encoder: the gate is not what these runs test
steps:
  - {technique: dynamic-int8, runtime: torch, compile: false}
"""
VARIANT = "01-dynamic-int8@torch-compile-False"  # the step's output folder under -o
FAST_EVAL = ["--limit", "8", "--threads", "1"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    drop = (CRASH_ENV, CRASH_PAUSE_ENV, CRASH_MARK_ENV, "MODELPRESS_REGISTRY_URL", "MODELPRESS_REGISTRY_STORE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "MODELPRESS_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


def cli(args: list[str], home: Path, *, ok: bool = True) -> str:
    """``modelpress ARGS`` in this process (the same command; only the runs that are killed need a process of their own)."""
    from typer.testing import CliRunner

    from modelpress.cli import app

    res = CliRunner().invoke(
        app, args, env={"MODELPRESS_HOME": str(home), "MODELPRESS_REGISTRY_URL": None, "MODELPRESS_REGISTRY_STORE": None}
    )
    if ok:
        assert res.exit_code == 0, f"modelpress {' '.join(args)} exited {res.exit_code}:\n{res.output[-3000:]}\n{res.exception!r}"
    return res.stdout


def killed_at(args: list[str], home: Path, point: str, *, after_s: float | None = None) -> None:
    """Run ``modelpress ARGS`` until it reaches the hook ``point``: it kills itself there
    (``after_s`` None), or goes on and is SIGKILLed from outside ``after_s`` seconds later, in the
    middle of whatever it does next."""
    marker = home.parent / f"reached-{time.monotonic_ns()}"
    errors = home.parent / "child.err"
    extra = {CRASH_ENV: point, **({CRASH_MARK_ENV: str(marker)} if after_s is not None else {})}
    with open(errors, "ab") as err, popen_group([*CLI, *args], env=_env(home, **extra), stdout=subprocess.DEVNULL, stderr=err) as proc:
        if after_s is None:
            code = proc.wait(RUN_TIMEOUT_S)
        else:
            deadline = time.monotonic() + PAUSE_TIMEOUT_S
            while not marker.exists():
                assert proc.poll() is None, f"exited {proc.returncode} before {point}: {errors.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"never reached {point}"
                time.sleep(0.02)
            time.sleep(after_s)
            proc.send_signal(signal.SIGKILL)
            code = proc.wait(30)
    assert code == -signal.SIGKILL, f"{point}: exited {code} (not killed): {errors.read_text()[-2000:]}"


def registry_check(home: Path) -> dict:
    report = json.loads(cli(["registry", "check", "--json"], home))
    assert report["ok"] and not report["corrupt"] and not report["missing"], report
    return report


def damage_only(home: Path) -> dict:
    """After a kill, before the next run: ``registry check`` finds no damage (at most leftovers: an orphan folder or a temporary one)."""
    report = json.loads(cli(["registry", "check", "--json"], home, ok=False))
    assert not report["corrupt"] and not report["missing"], report
    return report


def no_dead_temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def _artifact(folder: Path, size: int = 3 << 20) -> Artifact:
    sig = Signature(inputs=[TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])], outputs=[])
    manifest = Manifest(name="m", task="embedding", format="onnx", model_file="model.onnx", signature=sig)

    def fill(tmp: Path) -> None:
        (tmp / "model.onnx").write_bytes(os.urandom(size))  # big enough that a copy takes a moment
        (tmp / "extra").mkdir()
        for i in range(8):
            (tmp / "extra" / f"part-{i}.bin").write_bytes(os.urandom(64 << 10))

    return Artifact.write(folder, manifest, fill)


def test_registry_register_killed_at_several_points_then_check_passes_and_the_next_run_registers_once(home, tmp_path):
    art = _artifact(tmp_path / "art")
    register = ["registry", "register", str(art.path), "--name", "m", "--reuse"]
    cli(["registry", "register", str(_artifact(tmp_path / "first", 1000).path), "--name", "m"], home)  # v1: the state to keep
    killed_at(register, home, "during_copy")  # half the files copied into a temporary folder
    killed_at(register, home, "after_rename")  # the folder placed under its hash, no rows yet
    killed_at(register, home, "before_commit")  # the rows written, not committed
    # What the kills left is reported as leftovers, never as damage; the versions are intact.
    assert damage_only(home)["orphans"]
    assert [v["version"] for v in json.loads(cli(["registry", "list", "m", "--json"], home))] == [1]
    # The next run starts clean (dead temporaries removed, the placed folder reused) and registers once.
    assert json.loads(cli([*register, "--json"], home))["version"] == 2
    registry_check(home)
    assert [v["version"] for v in json.loads(cli(["registry", "list", "m", "--json"], home))] == [1, 2]


@pytest.mark.slow
@pytest.mark.needs_data
def test_optimize_killed_midway_then_check_passes_and_the_next_run_starts_clean(home, tmp_path, tiny_encoder, data_dir):
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    out = tmp_path / "out"
    args = ["optimize", str(tiny_encoder), "--recipe", str(tmp_path / "tiny.yaml"), "-o", str(out), *FAST_EVAL, "--force"]
    killed_at(args, home, "before_commit")  # registering the original, before its rows are committed
    killed_at(args, home, f"folder-filled:{VARIANT}", after_s=0.3)  # the variant written to a temporary folder
    if (out / VARIANT).exists():  # the kill may land before or after the rename: either way never half a variant
        assert Artifact.open(out / VARIANT).verify() == []
    damage_only(home)
    res = json.loads(cli([*args, "--json"], home))
    assert res["steps"][0]["shipped"] and res["steps"][0]["error"] is None and res["steps"][0]["registered"]
    variant = Artifact.open(out / VARIANT)
    assert variant.verify() == [] and variant.manifest.step is not None
    assert no_dead_temps(out) == []
    registry_check(home)


@pytest.mark.slow
@pytest.mark.needs_data
def test_tune_killed_midway_resumes_from_its_caches_and_never_reads_a_half_entry(home, tmp_path, tiny_encoder, data_dir):
    """ONNX Runtime candidates (no torch.compile: the tuner builds and times every candidate)."""
    import modelpress as mp
    from modelpress.export import cache as export_cache

    args = ["tune", str(tiny_encoder), "--data", "stsb-dev", "--runtime", "onnxruntime", *FAST_EVAL, "--batch-size", "4"]
    args += ["--seq-len", "16", "-o", str(tmp_path / "tuned"), "--budget", "10m"]
    onnx_entry = f"{export_cache.source_hash(mp.load(str(tiny_encoder)))[:20]}-onnx"
    exports, tunes = home / "cache" / "exports", home / "cache" / "tune"
    # 1. Killed with the model's ONNX export complete in the export cache's temporary folder, not yet in place.
    killed_at(args, home, f"folder-filled:{onnx_entry}")
    assert not (exports / onnx_entry).exists() and len(no_dead_temps(exports)) == 1
    # 2. Killed 0.2 s after a variant's artifact is in place, while it is being timed (no result cached for it).
    killed_at(args, home, "folder-placed:artifact", after_s=0.2)
    assert export_cache.open_entry(exports / onnx_entry) is not None  # rebuilt whole; the dead run's temporary folder removed
    entries = sorted(p for p in tunes.iterdir() if p.is_dir())
    half = [e for e in entries if (e / "artifact").is_dir() and not (e / "point.json").is_file()]
    done = [e for e in entries if (e / "point.json").is_file()]
    assert half and done
    for e in done:  # whole JSON, never a torn write
        json.loads((e / "point.json").read_text())
    damage_only(home)
    # 3. The next run resumes: finished candidates come from the cache, the half entry is built again.
    res = json.loads(cli([*args, "--json"], home))
    cached = {p["label"] for p in res["points"] if p["cached"]}
    assert cached and len(cached) < len(res["points"])
    assert all(p["status"] != "failed" for p in res["points"]), [p.get("error") for p in res["points"]]
    for e in sorted(p for p in tunes.iterdir() if p.is_dir()):  # every entry whole now
        assert (e / "point.json").is_file()
        if (e / "artifact").is_dir():
            assert Artifact.open(e / "artifact").verify() == []
    for e in exports.iterdir():
        assert e.is_file() or export_cache.open_entry(e) is not None, e
    assert no_dead_temps(tunes) == [] and no_dead_temps(exports) == []
    registry_check(home)


# -- a server killed mid-hot-swap and mid-canary ----------------------------------------------------
KEY = "fault-run-key-0123456789"
AUTH = {"x-api-key": KEY}
SERVER_START_TIMEOUT_S = 120  # a fresh interpreter imports torch and loads a tiny model
TEXT = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["steady traffic"]}]}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(url: str, port: int, home: Path, log: Path):
    cmd = [*CLI, "serve", "tiny-enc@production", "--registry", url, "--port", str(port), "--api-key", KEY, "--threads", "1"]
    with open(log, "ab") as fh:
        return popen_group([*cmd, "--log-level", "warning"], stdout=fh, stderr=subprocess.STDOUT, env=_env(home))


def _ready(base: str, proc, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}: {log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the server did not get ready in {SERVER_START_TIMEOUT_S} s: {log.read_text()[-3000:]}")


def _traffic(base: str, stop) -> list[int]:
    """Requests until ``stop`` is set or the server dies; the status codes answered."""
    import httpx

    codes: list[int] = []
    with httpx.Client(base_url=base, timeout=30) as c:
        while not stop.is_set():
            try:
                codes.append(c.post("/v2/models/tiny-enc/infer", json=TEXT).status_code)
            except httpx.HTTPError:  # SIGKILLed mid-request: traffic ends
                break
    return codes


@pytest.mark.slow
def test_a_server_killed_mid_hot_swap_during_a_canary_restarts_clean(home, tmp_path, tiny_encoder):
    import threading

    import httpx

    import modelpress as mp
    from modelpress.registry.api import Registry
    from modelpress.rollout.spec import ACTIVE

    v2 = tmp_path / "enc-v2"
    shutil.copytree(tiny_encoder, v2)
    (v2 / "README.md").write_text("version 2: the same weights, another artifact\n")  # another content hash
    url = str(tmp_path / "reg.db")
    with Registry(url) as reg:
        reg.register(mp.load(str(tiny_encoder)), "tiny-enc", stage="production")
        reg.register(mp.load(str(v2)), "tiny-enc")
    port, log = _free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    load = {"parameters": {"config": json.dumps({"source": "tiny-enc:2"})}}

    spec = {"candidate": "2", "steps": [50, 100], "window_s": 1.5, "min_requests": 3, "max_p99_ratio": 1000.0, "max_error_rate": 0.5}
    proc = _serve(url, port, home, log)
    stop, codes = threading.Event(), []
    try:  # a canary to version 2 in its first window, then a hot swap under traffic, killed 0.2 s into the load
        _ready(base, proc, log)
        sender = threading.Thread(target=lambda: codes.extend(_traffic(base, stop)), daemon=True)
        sender.start()
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as c:
            assert c.post("/rollouts/tiny-enc/start", json=spec).status_code == 201
            deadline = time.monotonic() + 60
            while c.get("/rollouts/tiny-enc").json()["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.3)
            threading.Thread(target=lambda: _quiet_post(c, "/v2/repository/models/tiny-enc/load", load), daemon=True).start()
            time.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
        sender.join(30)
    finally:
        stop.set()
        proc.end_group(grace=0)
    assert proc.returncode == -signal.SIGKILL
    assert codes and all(code == 200 for code in codes), sorted(set(codes))  # answered until the kill, never a 5xx
    # The next start: ready, the canary picked up where it was, a hot swap completes, the registry intact.
    proc = _serve(url, port, home, log)
    try:
        _ready(base, proc, log)
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as c:
            assert c.post("/v2/models/tiny-enc/infer", json=TEXT).status_code == 200
            assert c.get("/rollouts/tiny-enc").json()["status"] in ACTIVE  # killed in its first window: picked up again
            assert c.post("/rollouts/tiny-enc/abort", json={}).status_code in (200, 409)
            assert c.post("/v2/repository/models/tiny-enc/load", json=load).status_code == 200
            assert c.post("/v2/models/tiny-enc/infer", json=TEXT).status_code == 200
    finally:
        proc.end_group()
    report = json.loads(cli(["registry", "check", "--registry", url, "--json"], home))
    assert report["ok"], report


def _quiet_post(c, path: str, body: dict) -> None:
    import httpx

    with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
        c.post(path, json=body)
