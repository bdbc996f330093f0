"""Two real `modelpress serve` processes on one PostgreSQL registry: one drives the canary, the other follows
it, and takes it over when the first is SIGKILLed (the fast, fake-clock version is test_rollout_lease.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .._processes import wait_ready
from .conftest import text_request
from .test_rollout_process import SERVER_START_TIMEOUT_S, _free_port

KEY = "test-key-123456"
AUTH = {"x-api-key": KEY}
PG_ENV = "MODELPRESS_TEST_DATABASE_URL"
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
LEASE_S = 2.0  # the servers' lease time: the follower takes over within this (plus one sync) after the kill
ROLLOUT_TIMEOUT_S = 60  # the canary below ends in seconds; this only bounds a hung one
TAKEOVER_SLACK_S = 6.0  # after the lease time: one sync (under a second) plus a busy shared machine's delays


@pytest.fixture
def pg_registry(tmp_path: Path, tiny_encoder: Path) -> Iterator[tuple[str, Path]]:
    """(URL, home): a registry in a fresh PostgreSQL schema with tiny-enc:1 in production and tiny-enc:2; dropped afterwards."""
    import sqlalchemy as sa

    import modelpress as mp
    from modelpress.registry.api import Registry

    base = os.environ.get(PG_ENV) or PG_DEFAULT
    admin = sa.create_engine(base, connect_args={"connect_timeout": 3})
    schema = f"mp_lease_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    except (sa.exc.SQLAlchemyError, OSError) as exc:  # no server, no driver: nothing to test against
        admin.dispose()
        pytest.skip(f"no PostgreSQL server answers at {base} ({type(exc).__name__}); set {PG_ENV}")
    url = sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    home = tmp_path / "home"
    try:
        with Registry(url, home=home) as reg:
            reg.register(mp.load(str(tiny_encoder)), "tiny-enc", stage="production")
            reg.register(mp.load(str(tiny_encoder)), "tiny-enc")
        yield url, home
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


def _spawn(url: str, home: Path, port: int, log_path: Path) -> subprocess.Popen:
    from .._processes import popen_group

    cmd = [sys.executable, "-c", "from modelpress.cli import main; main()", "serve", "tiny-enc@production"]
    cmd += ["--registry", url, "--port", str(port), "--api-key", KEY, "--threads", "1", "--log-level", "warning"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MODELPRESS_HOME": str(home), "MODELPRESS_ROLLOUT_LEASE_S": str(LEASE_S)}
    with open(log_path, "ab") as log:
        return popen_group(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow
@pytest.mark.postgres
def test_two_servers_one_controller_the_follower_routes_the_recorded_split_and_takes_over_after_a_sigkill(pg_registry, tmp_path):
    import httpx

    url, home = pg_registry
    ports = [_free_port(), _free_port()]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_spawn(url, home, p, log) for p, log in zip(ports, logs, strict=True)]
    a_url, b_url = (f"http://127.0.0.1:{p}" for p in ports)
    stop = threading.Event()

    def traffic(base: str) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            while not stop.is_set():
                try:
                    c.post("/v2/models/tiny-enc/infer", json=text_request(["steady traffic"]))
                except httpx.HTTPError:  # the server is SIGKILLed mid-request: expected, this sender ends
                    return

    senders = [threading.Thread(target=traffic, args=(u,), daemon=True) for u in (a_url, b_url)]
    try:
        for proc, u, log in zip(procs, (a_url, b_url), logs, strict=True):
            wait_ready(f"{u}/v2/health/ready", proc, SERVER_START_TIMEOUT_S, interval=0.1, log=log)
        with httpx.Client(base_url=a_url, headers=AUTH, timeout=60) as a, httpx.Client(base_url=b_url, headers=AUTH, timeout=60) as b:
            spec = {  # loose thresholds: this test is about who decides, not about the SLO checks
                "candidate": "2",
                "steps": [20, 60, 100],
                "window_s": 1.5,
                "min_requests": 3,
                "max_p99_ratio": 1000.0,
                "max_error_rate": 0.5,
            }
            r = a.post("/rollouts/tiny-enc/start", json=spec)
            assert r.status_code == 201, r.text
            a_owner = r.json()["controller"]
            assert a_owner.endswith(f":{ports[0]}") and r.json()["driving"] is True
            for t in senders:
                t.start()
            deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
            while True:  # b follows: the same recorded decision, the same split on its router
                sa, sb = a.get("/rollouts/tiny-enc").json(), b.get("/rollouts/tiny-enc")
                served_b = b.get("/v2/models/tiny-enc").json()["parameters"]["policy"]
                if sb.status_code == 200 and sa["status"] == "running" and sb.json()["seq"] == sa["seq"] and served_b == sa["policy"]:
                    break
                assert time.monotonic() < deadline, (sa, sb.text, served_b)
                time.sleep(0.05)
            assert sb.json()["driving"] is False and sb.json()["controller"] == a_owner
            r = b.post("/rollouts/tiny-enc/pause")
            assert r.status_code == 409 and a_owner in r.json()["error"]
            r = b.post("/rollouts/tiny-enc/start", json=spec)
            assert r.status_code == 409 and a_owner in r.json()["error"]

            while (status := a.get("/rollouts/tiny-enc").json())["step"] != 1:
                assert time.monotonic() < deadline and status["status"] == "running", status
                time.sleep(0.05)
            procs[0].kill()  # SIGKILL mid-canary: no lease handed back, it has to expire
            procs[0].wait(30)
            killed_at = time.monotonic()
            while not (sb := b.get("/rollouts/tiny-enc").json())["driving"]:
                assert time.monotonic() < deadline, sb
                time.sleep(0.05)
            took_s = time.monotonic() - killed_at
            while (sb := b.get("/rollouts/tiny-enc").json())["status"] == "running":
                assert time.monotonic() < deadline, sb
                time.sleep(0.1)
            events = b.get("/rollouts/tiny-enc/events").json()
            served_b = b.get("/v2/models/tiny-enc").json()
        assert sb["status"] == "succeeded" and sb["controller"] != a_owner and sb["promoted"] == "tiny-enc:2", sb
        assert took_s < LEASE_S + TAKEOVER_SLACK_S, took_s
        actions = [e["action"] for e in events]
        assert actions.count("start") == 1 and actions.count("takeover") == 1 and actions[-1] == "promote", actions
        assert actions.count("advance") == 2, actions  # 0 -> 1 by a, 1 -> 2 by b: no step decided twice
        assert served_b["parameters"]["policy"] == {"policy": "single", "version": "2"}
    finally:
        stop.set()
        for proc in procs:
            proc.kill()
            proc.wait(30)
        for t in senders:
            if t.is_alive():
                t.join(30)
    from modelpress.registry.api import Registry

    with Registry(url, home=home) as reg:
        assert reg.get("tiny-enc@production").version == 2
        assert reg.leases.get("tiny-enc").owner is None  # handed back when the rollout ended
