"""Fault runs (issue 12, item 6): real ``modelpress`` processes SIGKILLed at several points of
``registry register``, ``optimize``, ``tune``, and of a ``modelpress serve`` running a canary and
hot swaps; afterwards ``modelpress registry check`` passes, the caches hold no half-written entry
that a later run would read, and the next run resumes or starts clean (a restarted server resumes
the rollout exactly as the registry recorded it).

The server's points: ``version-loading:NAME:VERSION`` (a version's runner about to load, in the
load's worker thread), ``hot-swap:NAME:VERSION`` (a new default loaded and warm, traffic not
switched yet) and ``rollout-recorded:ACTION`` (a rollout decision committed in the registry, not
yet applied to traffic; ``promote`` is the promotion's transaction).

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
from tests._processes import popen_group, wait_ready

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
    # --no-compound: no training candidates (10m would cover them); the resume of the cheap ones is what is killed here
    args += ["--seq-len", "16", "-o", str(tmp_path / "tuned"), "--budget", "10m", "--no-compound"]
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


def _traffic(base: str, stop, codes: list[int]) -> None:
    """Requests until ``stop`` is set or the server dies; the status codes answered go to ``codes``."""
    import httpx

    with httpx.Client(base_url=base, timeout=30) as c:
        while not stop.is_set():
            try:
                codes.append(c.post("/v2/models/tiny-enc/infer", json=TEXT).status_code)
            except httpx.HTTPError:  # SIGKILLed mid-request: traffic ends
                return


@contextlib.contextmanager
def _server_under_traffic(url: str, port: int, home: Path, log: Path, crash: str | None = None, pause: Path | None = None):
    """A ``modelpress serve`` that must come up ready, with traffic from a thread from then on; ``crash``: its kill
    point (it kills itself there, or, with ``pause``, the thread that reaches it writes ``pause`` and sleeps until the
    test kills the server). Afterwards every request it answered was a 200 (none failed but those cut off by the kill)."""
    import threading

    extra = {CRASH_ENV: crash, **({CRASH_PAUSE_ENV: str(pause)} if pause else {})} if crash else {}
    cmd = [*CLI, "serve", "tiny-enc@production", "--registry", url, "--port", str(port), "--api-key", KEY, "--threads", "1"]
    with open(log, "ab") as fh:
        proc = popen_group([*cmd, "--log-level", "warning"], stdout=fh, stderr=subprocess.STDOUT, env=_env(home, **extra))
    base, stop, codes = f"http://127.0.0.1:{port}", threading.Event(), []
    sender = threading.Thread(target=_traffic, args=(base, stop, codes), daemon=True)
    try:
        wait_ready(f"{base}/v2/health/ready", proc, SERVER_START_TIMEOUT_S, interval=0.1, log=log)
        sender.start()
        deadline = time.monotonic() + 30
        while len(codes) < 3:  # answering before anything else happens
            assert sender.is_alive() and time.monotonic() < deadline, f"no traffic answered: {codes}"
            time.sleep(0.02)
        yield proc
    finally:
        stop.set()
        if sender.is_alive():
            sender.join(30)
        proc.end_group(grace=0 if crash else 5)
    assert all(code == 200 for code in codes), sorted(set(codes))  # answered until the kill, never a 5xx


def _killed(proc, log: Path, timeout_s: float = 90) -> None:
    """Wait for a server to kill itself at its point (or be killed by the test)."""
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server was not killed in {timeout_s} s: {log.read_text()[-3000:]}") from None
    assert proc.returncode == -signal.SIGKILL, f"exited {proc.returncode}, not killed: {log.read_text()[-3000:]}"


@pytest.mark.slow
def test_a_canary_and_hot_swaps_killed_at_four_points_each_restart_resumes_as_the_registry_recorded(home, tmp_path, tiny_encoder):
    """One registry, one port, five servers in turn: four SIGKILLed (mid candidate load, a hot swap loaded but not
    switched during the canary, an advance recorded but not applied, a promotion recorded but not applied), the
    last one clean. Each comes up ready, answers only 200s, and picks up the rollout where the registry says it is."""
    import httpx

    import modelpress as mp
    from modelpress.registry.api import Registry

    v2 = tmp_path / "enc-v2"
    shutil.copytree(tiny_encoder, v2)
    (v2 / "README.md").write_text("version 2: the same weights, another artifact\n")  # another content hash
    url = str(tmp_path / "reg.db")
    with Registry(url) as reg:
        reg.register(mp.load(str(tiny_encoder)), "tiny-enc", stage="production")
        reg.register(mp.load(str(v2)), "tiny-enc")
    port, log = _free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    spec = {"candidate": "2", "steps": [50, 100], "window_s": 1.5, "min_requests": 3, "max_p99_ratio": 1000.0, "max_error_rate": 0.5}

    def recorded() -> tuple[dict, int, list[dict]]:
        """The rollout state, the version in production and the decisions, as the registry has them."""
        with Registry(url) as reg:
            events = [e["decision"] for e in reg.rollouts.events("tiny-enc")]
            return reg.rollouts.get("tiny-enc")["rollout_state"], reg.get("tiny-enc@production").version, events

    def rollout(c) -> dict:
        res = c.get("/rollouts/tiny-enc")
        assert res.status_code == 200, res.text
        return res.json()

    # 1. The canary starts with version 2 not loaded: it loads in the background, killed with that load under way
    #    (the loading thread held at its point: a kill "0.1 s into the load" raced a tiny model's load on fast hosts).
    marker = tmp_path / "reached"
    with _server_under_traffic(url, port, home, log, "version-loading:tiny-enc:2", marker) as proc:
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as c:
            assert c.post("/rollouts/tiny-enc/start", json=spec).json()["status"] == "loading"
            deadline = time.monotonic() + 60
            while not marker.exists():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.02)
            assert rollout(c)["status"] == "loading"  # held there; version 1 answers the traffic meanwhile
        proc.send_signal(signal.SIGKILL)
        _killed(proc, log)
    state, production, events = recorded()
    assert (state["status"], state["step"], production, events[-1]["action"]) == ("loading", 0, 1, "start"), state

    # 2. Restarted: the candidate loads again and step 0 (50/50) begins. Paused (so that no window decides
    #    meanwhile), a hot swap to version 2 is killed with that version loaded and warm, traffic not switched.
    with _server_under_traffic(url, port, home, log, "hot-swap:tiny-enc:2") as proc:
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as c:
            deadline = time.monotonic() + 60
            while (now := rollout(c))["status"] != "running":
                assert now["status"] == "loading" and time.monotonic() < deadline, now
                time.sleep(0.05)
            assert now["weights"] == {"1": 50.0, "2": 50.0}, now
            assert c.post("/rollouts/tiny-enc/pause", json={}).json()["status"] == "paused"
            load = {"parameters": {"config": json.dumps({"source": "tiny-enc:2"})}}
            with contextlib.suppress(httpx.HTTPError):  # the server dies under it
                c.post("/v2/repository/models/tiny-enc/load", json=load)
        _killed(proc, log)
    state, production, events = recorded()
    assert [e["action"] for e in events] == ["start", "resume", "loaded", "pause"], events
    assert (state["status"], state["step"], state["weights"], production) == ("paused", 0, {"1": 50.0, "2": 50.0}, 1), state

    # 3. Restarted paused at step 0, 50/50 (the hot swap never happened); resumed by hand, its window passes and
    #    the advance to step 1 is recorded, then the server is killed before it routes by it.
    with _server_under_traffic(url, port, home, log, "rollout-recorded:advance") as proc:
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as c:
            now = rollout(c)
            assert (now["status"], now["step"], now["weights"]) == ("paused", 0, {"1": 50.0, "2": 50.0}), now
            assert c.post("/rollouts/tiny-enc/resume", json={}).json()["status"] == "running"  # its lease taken back at once
        _killed(proc, log)
    state, production, events = recorded()
    assert [(e["action"], e["step"]) for e in events[-3:]] == [("resume", 0), ("resume", 0), ("advance", 1)], events
    assert events[-2]["weights"] == {"1": 50.0, "2": 50.0}, events  # resumed with the recorded split
    assert (state["status"], state["step"], state["weights"], production) == ("running", 1, {"2": 100.0}, 1), state

    # 4. Restarted at step 1, as recorded; the last window passes and the promotion is committed (version 2 in
    #    production, in the same transaction as the decision), then the server is killed before it routes by it.
    with _server_under_traffic(url, port, home, log, "rollout-recorded:promote") as proc:
        _killed(proc, log)
    state, production, events = recorded()
    assert [(e["action"], e["step"]) for e in events[-2:]] == [("resume", 1), ("promote", 1)], events
    assert events[-2]["weights"] == {"2": 100.0}, events  # resumed with the split the advance recorded
    assert (state["status"], state["promoted"], production) == ("succeeded", "tiny-enc:2", 2), state

    # 5. A clean start serves the promoted version; the finished rollout is not resumed; a hot swap completes.
    with _server_under_traffic(url, port, home, log), httpx.Client(base_url=base, headers=AUTH, timeout=60) as c:
        assert c.post("/v2/models/tiny-enc/infer", json=TEXT).json()["model_version"] == "2"
        load = {"parameters": {"config": json.dumps({"source": "tiny-enc:1"})}}
        assert c.post("/v2/repository/models/tiny-enc/load", json=load).status_code == 200
        assert c.post("/v2/models/tiny-enc/infer", json=TEXT).json()["model_version"] == "1"
    assert recorded()[2][-1]["action"] == "promote"  # nothing recorded since
    registry_check_at(url, home)


def registry_check_at(url: str, home: Path) -> None:
    report = json.loads(cli(["registry", "check", "--registry", url, "--json"], home))
    assert report["ok"] and not report["corrupt"] and not report["missing"], report
