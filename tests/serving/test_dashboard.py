"""The dashboard: its JSON, and the page itself rendered by headless Chromium with live numbers.

Chromium is Debian's ``chromium`` package. When it is missing, the fixture installs it with
``apt-get install -y chromium`` (root only; about 40 s) and skips with the reason when that is
impossible. The page is loaded with ``--dump-dom`` after a virtual time budget: virtual time
stops while fetches are pending, so the dumped DOM is what the page drew from the server's data.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from modelpress.rollout.routing import ShadowPolicy
from modelpress.serving.routing import SinglePolicy

from .._processes import run_group
from .conftest import client_for, make_server, text_request
from .rollout_support import load_version

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIRTUAL_TIME_BUDGET_MS = 5000  # five polls at the page's 1 s interval, in virtual time (a second or two of real time)
CHROMIUM_TIMEOUT_S = 90  # a cold start on a loaded machine takes a few seconds; this bounds a hung browser
APT_TIMEOUT_S = 600


@functools.cache
def _find_or_install_chromium() -> tuple[str | None, str]:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found, ""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "chromium is not installed and cannot be installed here (needs root and apt-get): apt-get install -y chromium"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "install", "-y", "-q", "chromium"],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "chromium"],
    ):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=APT_TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired:
            return None, f"`{' '.join(cmd)}` did not finish within {APT_TIMEOUT_S} s"
        if cmd[1] == "install" and done.returncode == 0 and shutil.which("chromium"):
            return shutil.which("chromium"), ""
    return None, f"`apt-get install -y chromium` failed: {(done.stderr or done.stdout).strip().splitlines()[-1:] or ['no output']}"


@pytest.fixture(scope="session")
def chromium() -> str:
    path, why = _find_or_install_chromium()
    if path is None:
        pytest.skip(why)
    return path


class _Elements(HTMLParser):
    """Every element of a page: (tag, attributes, text directly inside it)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[int] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, []))
        if tag not in ("meta", "link", "br", "img", "input"):  # HTML's void elements have no end tag
            self._open.append(len(self.elements) - 1)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, []))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, -1, -1):  # close the innermost open element of this tag, and what it holds
            if self.elements[self._open[depth]][0] == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        if self._open:
            self.elements[self._open[-1]][2].append(data)

    def find(self, tag: str, **attrs: str) -> list[tuple[dict[str, str], str]]:
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [(a, "".join(t).strip()) for g, a, t in self.elements if g == tag and all(a.get(k) == v for k, v in want.items())]


def _render(chromium: str, url: str) -> _Elements:
    with tempfile.TemporaryDirectory(prefix="mp-chromium-") as profile:
        done = run_group(  # Chromium's helper processes end with it, also on a timeout
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=CHROMIUM_TIMEOUT_S,
        )
    assert done.returncode == 0 and "<main" in done.stdout, done.stderr[-2000:]
    page = _Elements()
    page.feed(done.stdout)
    return page


async def _serve_two_models(server, tiny_encoder: Path, tiny_classifier: Path) -> None:
    await load_version(server, str(tiny_encoder), "enc", "1")
    server.repository.routers["enc"].set_policy(SinglePolicy("1"))
    await load_version(server, str(tiny_encoder), "enc", "2")
    await load_version(server, str(tiny_classifier), "cls", "1")
    await load_version(server, str(tiny_classifier), "cls", "2")
    server.repository.routers["cls"].set_policy(ShadowPolicy("1", "2"))


@pytest.mark.anyio
async def test_dashboard_data_has_per_version_numbers_split_shadow_and_rollout(tiny_encoder, tiny_classifier):
    server = make_server()
    async with client_for(server) as c:
        await _serve_two_models(server, tiny_encoder, tiny_classifier)
        for version, n in (("1", 7), ("2", 5)):
            for i in range(n):
                assert (await c.post(f"/v2/models/enc/versions/{version}/infer", json=text_request([f"t{i}"]))).status_code == 200
        for i in range(4):
            assert (await c.post("/v2/models/cls/infer", json=text_request([f"a film {i}"]))).status_code == 200
        await server.mirror.wait(10)
        await server.rollouts.start("enc", {"candidate": "2", "strategy": "ab", "steps": [30], "window_s": 30})
        page = await c.get("/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/dashboard/dashboard.js" in page.text
        assert "polyline" in (await c.get("/dashboard/dashboard.js")).text
        data = (await c.get("/dashboard/data?span=120")).json()
        assert (await c.get("/dashboard/data?span=-3")).status_code == 400
    models = {m["name"]: m for m in data["models"]}
    enc = {v["version"]: v for v in models["enc"]["versions"]}
    assert enc["1"]["totals"]["requests"] == 7 and enc["2"]["totals"]["requests"] == 5
    assert sum(p["requests"] for p in enc["1"]["series"]) == 7 and enc["1"]["totals"]["p99_ms"] > 0
    assert models["enc"]["weights"] == {"2": 30.0, "1": 70.0} and models["enc"]["rollout"]["status"] == "running"
    cls = {v["version"]: v for v in models["cls"]["versions"]}
    assert cls["2"]["shadow"]["requests"] == 4 and cls["2"]["shadow"]["agreement"] == 1.0 and models["cls"]["shadow"] == {"2": 1.0}
    assert cls["1"]["totals"]["requests"] == 4 and cls["2"]["totals"]["requests"] == 0


def test_dashboard_renders_live_numbers_in_headless_chromium(chromium, tiny_encoder, tiny_classifier):
    server = make_server()
    with server.in_thread() as running:
        asyncio.run_coroutine_threadsafe(_serve_two_models(server, tiny_encoder, tiny_classifier), server.loop).result(120)
        with httpx.Client(base_url=running.url, timeout=30) as c:
            for version, n in (("1", 7), ("2", 5)):
                for i in range(n):
                    assert c.post(f"/v2/models/enc/versions/{version}/infer", json=text_request([f"t{i}"])).status_code == 200
            for i in range(4):
                assert c.post("/v2/models/cls/infer", json=text_request([f"a film {i}"])).status_code == 200
            asyncio.run_coroutine_threadsafe(server.mirror.wait(10), server.loop).result(20)
            start = {"candidate": "2", "strategy": "ab", "steps": [30], "window_s": 30}
            asyncio.run_coroutine_threadsafe(server.rollouts.start("enc", start), server.loop).result(30)
        page = _render(chromium, running.url + "/dashboard")
    status = page.find("span", id="status")[0]
    assert int(status[0]["data-polls"]) >= 2 and status[1].startswith("updated")  # it polled, and kept polling
    cells = {(a["data-model"], a["data-version"], a["data-field"]): text for a, text in page.find("td") if "data-field" in a}
    assert cells[("enc", "1", "requests")] == "7" and cells[("enc", "2", "requests")] == "5"
    assert cells[("enc", "1", "errors")] == "0" and float(cells[("enc", "1", "p99_ms")]) > 0
    assert cells[("enc", "1", "weight")] == "70.0%" and cells[("enc", "2", "weight")] == "30.0%"
    assert cells[("cls", "2", "shadow_requests")] == "4" and cells[("cls", "2", "agreement")] == "1.0000"
    assert cells[("cls", "1", "requests")] == "4" and cells[("cls", "2", "weight")] == "shadow 100%"
    for chart in ("rate", "error_rate", "p50_ms", "p99_ms"):  # each chart has a line per version that answered
        assert len(page.find("svg", data_chart=chart, data_model="enc")) == 1
    lines = page.find("polyline")
    assert {a["data-version"] for a, _ in lines} == {"1", "2"}
    assert all(int(a["data-points"]) >= 1 and a["points"].count(",") >= 1 for a, _ in lines)
    assert len(lines) == 4 * 2 + 4  # enc: 4 charts x 2 versions; cls: 4 charts x version 1 (version 2 only shadowed)
    split = {(a["data-model"], a["data-version"]): float(a["data-weight"]) for a, _ in page.find("div") if a.get("data-weight")}
    assert split == {("enc", "2"): 30.0, ("enc", "1"): 70.0, ("cls", "1"): 100.0}
    rollout = [(a, text) for a, text in page.find("div") if a.get("class") == "rollout" and a.get("data-model") == "enc"]
    assert rollout and rollout[0][0]["data-status"] == "running" and rollout[0][0]["data-step"] == "0"
    assert any(a.get("data-action") == "start" for a, _ in page.find("li"))
