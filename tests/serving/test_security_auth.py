"""Closed by default (issue 12): management needs a key (a generated one when none is configured), public routes can
each be put behind it, a non-loopback bind needs a key, and local clients find the generated key."""

from __future__ import annotations

import os
import stat

import pytest

from modelpress.errors import ConfigError

from .conftest import add_model, client_for, make_server, text_request

pytestmark = pytest.mark.anyio
API_KEY = "test-key-0123456789"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh MODELPRESS_HOME: where a server without a key writes the one it generates."""
    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


async def test_without_a_key_management_is_closed_with_a_generated_private_key(home, tiny_encoder, capsys):
    server = make_server()  # no api_key: the default
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        for method, path in [
            ("POST", "/v2/repository/index"),
            ("POST", "/v2/repository/models/enc/unload"),
            ("POST", "/v2/repository/models/enc/load"),
            ("GET", "/rollouts"),
            ("POST", "/rollouts/enc/start"),
            ("POST", "/feedback"),
            ("GET", "/no/such/route"),  # closed by default: a route nobody declared public needs the key too
        ]:
            r = await c.request(method, path, json={})
            assert r.status_code == 401, (path, r.status_code, r.text)
        assert "enc" in server.repository.routers  # the unauthenticated unload did nothing
        key_path = home / "server.key"
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
        key = key_path.read_text().strip()
        assert key == server.api_key and len(key) >= 32
        assert capsys.readouterr().err.count(key) == 1  # printed once, to stderr (not logged: a log level could hide it)
        index = await c.post("/v2/repository/index", headers={"x-api-key": key})
        assert index.status_code == 200 and index.json()[0]["name"] == "enc"
        assert (await c.post("/v2/models/enc/infer", json=text_request(["open"]))).status_code == 200  # inference is public
    again = make_server()  # a second server of this user takes the same key (local clients read one file)
    assert again.api_key == key


def test_a_key_file_others_can_read_is_refused(home):
    from modelpress.serving.security import load_or_create_key, read_key_file

    key, created = load_or_create_key()
    assert created and read_key_file() == key
    path = home / "server.key"
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_key_file()
    path.unlink()
    os.symlink(home / "elsewhere", path)
    with pytest.raises(ConfigError, match="a link"):
        read_key_file()


PUBLIC_ROUTES = [  # (the flag that protects it, method, path)
    ("protect_inference", "POST", "/v2/models/enc/infer"),
    ("protect_inference", "GET", "/v1/models"),
    ("protect_health", "GET", "/v2/health/ready"),
    ("protect_health", "GET", "/v2/models/enc/ready"),
    ("protect_metrics", "GET", "/metrics"),
    ("protect_dashboard", "GET", "/dashboard"),
    ("protect_docs", "GET", "/openapi.json"),
]


async def test_each_public_route_can_be_put_behind_the_key(home, tiny_encoder):
    flags = sorted({flag for flag, _, _ in PUBLIC_ROUTES})
    for protected in flags:  # one flag on at a time: it closes its routes and no other
        server = make_server(api_key=API_KEY, **{protected: True})
        async with client_for(server) as c:
            await add_model(server, str(tiny_encoder), "enc", instances=1)
            for flag, method, path in PUBLIC_ROUTES:
                body = text_request(["a"]) if method == "POST" else None
                r = await c.request(method, path, json=body)
                assert r.status_code == (401 if flag == protected else 200), (protected, path, r.status_code, r.text[:200])
                if flag == protected:
                    r = await c.request(method, path, json=body, headers={"authorization": f"Bearer {API_KEY}"})
                    assert r.status_code == 200, r.text[:200]


async def test_management_can_be_switched_off(home, tiny_encoder):
    server = make_server(api_key=API_KEY, management=False)
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        r = await c.post("/v2/repository/index", headers={"x-api-key": API_KEY})
        assert r.status_code == 403 and "switched off" in r.json()["error"]


def test_a_non_loopback_host_without_a_key_is_refused(home, monkeypatch):
    from typer.testing import CliRunner

    from modelpress.cli import app
    from modelpress.serving.app import check_bind
    from modelpress.serving.config import ServerConfig

    with pytest.raises(ConfigError, match="no API key is set"):
        check_bind(ServerConfig(host="0.0.0.0"))
    check_bind(ServerConfig(host="0.0.0.0", api_key=API_KEY))
    check_bind(ServerConfig(host="::1"))
    served: list[ServerConfig] = []
    monkeypatch.setattr("modelpress.rollout.serve", served.append)  # what the CLI would run: capture its config instead
    monkeypatch.delenv("MODELPRESS_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "minilm", "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "no API key is set" in result.output and not served
    # --protect-inference without --api-key is kept (the generated key protects inference), not dropped
    result = CliRunner().invoke(app, ["serve", "minilm", "--protect-inference", "--protect-metrics"])
    assert result.exit_code == 0, result.output
    assert served[-1].protect_inference and served[-1].protect_metrics and served[-1].api_key is None
    result = CliRunner().invoke(app, ["serve", "minilm", "--protect-all", "--allow-load-from", "/srv/models", "--no-management"])
    cfg = served[-1]
    assert result.exit_code == 0 and cfg.protect_health and cfg.protect_docs and cfg.protect_dashboard
    assert cfg.allow_load_from == ["/srv/models"] and not cfg.management


def test_local_clients_read_the_generated_key(home):
    from modelpress.rollout.client import local_key
    from modelpress.serving.security import load_or_create_key

    assert local_key("http://127.0.0.1:8000") is None  # no server wrote one yet
    key, _ = load_or_create_key()
    assert local_key("http://127.0.0.1:8000") == key == local_key("http://localhost:9000/")
    assert local_key("http://models.example.com:8000") is None  # never sent to another machine


async def test_a_protected_dashboard_asks_the_browser_for_the_key(home, tiny_encoder):
    import base64

    server = make_server(api_key=API_KEY, protect_dashboard=True)
    async with client_for(server) as c:
        await add_model(server, str(tiny_encoder), "enc")
        r = await c.get("/dashboard")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")  # the browser shows its prompt
        basic = base64.b64encode(f"anyone:{API_KEY}".encode()).decode()
        assert (await c.get("/dashboard", headers={"authorization": f"Basic {basic}"})).status_code == 200
        assert (await c.get("/dashboard/data", headers={"authorization": f"Basic {basic}"})).status_code == 200
        wrong = base64.b64encode(b"anyone:not-the-key").decode()
        assert (await c.get("/dashboard", headers={"authorization": f"Basic {wrong}"})).status_code == 401
        assert (await c.post("/v2/repository/index")).headers["www-authenticate"] == "Bearer"  # API routes: no prompt


def test_every_path_has_a_kind_and_unknown_ones_are_management():
    from modelpress.serving.security import route_kind

    kinds = {
        "/v2/models/enc/infer": "inference",
        "/v2/models/enc/versions/1/infer": "inference",
        "/v2/models/ready": "inference",  # the metadata of a model named 'ready', not a probe
        "/v1/chat/completions": "inference",
        "/invocations": "inference",
        "/v2/models/enc/ready": "health",
        "/v2/models/enc/versions/1/ready": "health",
        "/ping": "health",
        "/metrics": "metrics",
        "/dashboard/data": "dashboard",
        "/openapi.json": "docs",
        "/v2/repository/index": "management",
        "/rollouts/enc/promote": "management",
        "/feedback": "management",
        "/v2/health/../repository/index": "management",
        "/anything-else": "management",
    }
    assert {path: route_kind(path) for path in kinds} == kinds
