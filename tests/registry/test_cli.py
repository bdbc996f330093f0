"""``modelpress registry ...`` through Typer's runner on each backend: output, JSON, exit codes, no tracebacks."""

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from modelpress.cli import app as main_app
from modelpress.cli.registry import app

runner = CliRunner()
COMMANDS = ("list", "show", "lineage", "register", "promote", "rollback", "tag", "note", "delete", "export", "check")


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    """Rich tables wrap at the runner's 80 columns; these assertions read whole cells."""
    from modelpress.cli import registry as registry_cli

    monkeypatch.setattr(registry_cli, "out", Console(width=240))
    monkeypatch.setattr(registry_cli, "console", Console(stderr=True, width=240))


def invoke(*args, ok=True):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def as_json(*args):
    return json.loads(invoke(*args, "--json").stdout)


@pytest.fixture
def cli(backend, make_artifact):
    """A registry with m:1 (original), m:2 (quantized from m:1), both registered through the CLI."""
    invoke("register", make_artifact("orig").path, "--name", "m", "-m", "spearman=0.8", "-m", "latency_ms=10", "--tag", "baseline")
    invoke(
        "register",
        make_artifact("int8").path,
        "--name",
        "m",
        "--parent",
        "m:1",
        "--step",
        '{"technique": "quantize", "bits": 8}',
        "-m",
        "spearman=0.78",
        "-m",
        "latency_ms=4",
    )
    return make_artifact


def test_every_command_has_help_and_json():
    for cmd in COMMANDS:
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "--json" in res.output, cmd


def test_mounted_under_the_main_cli():
    res = runner.invoke(main_app, ["registry", "--help"])
    assert res.exit_code == 0 and all(cmd in res.output for cmd in COMMANDS)


def test_register_list_show(cli):
    models = as_json("list")
    assert [(m["name"], m["versions"], m["latest"]) for m in models] == [("m", 2, 2)]
    versions = as_json("list", "m")
    assert [v["ref"] for v in versions] == ["m:1", "m:2"] and versions[1]["parents"] == ["m:1"]
    shown = as_json("show", "m:2")
    assert shown["step"] == "quantize" and shown["config"] == {"technique": "quantize", "bits": 8}
    assert {m["name"]: m["value"] for m in shown["metrics"]} == {"spearman": 0.78, "latency_ms": 4.0}
    assert as_json("show", "m:1")["tags"] == ["baseline"]
    text = invoke("list").stdout
    assert "m" in text and "2" in text
    text = invoke("list", "m").stdout
    assert "quantize" in text and "baseline" in text
    text = invoke("show", "m:latest").stdout
    assert "m:2 (candidate)" in text and "spearman" in text


def test_register_json_and_reuse(cli):
    art = cli("orig")
    data = as_json("register", art.path, "--name", "m", "--reuse")
    assert data["ref"] == "m:1" and data["reused"] is True
    res = invoke("register", art.path, "--name", "m", "--reuse")
    assert "already registered as m:1" in res.stderr
    assert as_json("register", art.path, "--name", "m")["ref"] == "m:3"


def test_lineage_tree_and_json(cli):
    tree = as_json("lineage", "m:2")
    assert tree["focus"] == "m:2" and tree["root"]["ref"] == "m:1" and tree["root"]["children"][0]["step"] == "quantize"
    text = invoke("lineage", "m:1").stdout
    assert "step: quantize (bits=8)" in text and "spearman 0.8 -> 0.78" in text and "latency_ms 10 -> 4 (-60.0%)" in text


def test_promote_rollback(cli):
    assert as_json("promote", "m:1", "--stage", "production", "--why", "baseline")["stage"] == "production"
    res = invoke("promote", "m:2", "--why", "2.5x faster", "--who", "ana")
    assert "m:2 is now production" in res.stderr
    assert as_json("show", "m@production")["ref"] == "m:2"
    history = as_json("show", "m:1")["stage_history"]
    assert history[-1]["to"] == "archived" and history[-1]["why"] == "2.5x faster" and history[-1]["who"] == "ana"
    assert as_json("rollback", "m")["ref"] == "m:1"
    res = invoke("rollback", "m", ok=False)
    assert res.exit_code == 2 and "nothing to roll back to" in res.stderr


def test_tag_note_delete_export_check(cli, tmp_path):
    assert as_json("tag", "m:2", "fast")["tags"] == ["fast"]
    assert as_json("tag", "m:2", "fast", "--remove")["tags"] == []
    invoke("tag", "m:2", "[/weird]")  # markup-like text is shown, not interpreted
    assert "[/weird]" in invoke("list", "m").stdout
    assert as_json("note", "m:2", "calibrated on 64 sentences")["notes"][0]["text"] == "calibrated on 64 sentences"
    out = as_json("export", "m", tmp_path / "out")
    assert out["ref"] == "m:2" and (tmp_path / "out" / "modelpress.json").is_file()
    res = invoke("delete", "m:1", ok=False)
    assert res.exit_code == 2 and "has descendants (m:2)" in res.stderr and "--force" in res.stderr
    assert as_json("delete", "m:1", "--force")["files_removed"] is True
    report = as_json("check")
    assert report["ok"] and report["versions_checked"] == 1
    assert "ok" in invoke("check").stderr


def test_check_exits_1_on_damage_and_repair(cli):
    shown = as_json("show", "m:1")
    Path(shown["path"], "model.onnx").write_bytes(b"rot")
    orphan = Path(shown["path"]).parent / ("e" * 64)
    orphan.mkdir()
    res = invoke("check", ok=False)
    assert res.exit_code == 1 and "corrupt" in res.stderr and "m:1" in res.stderr and "leftover" in res.stderr
    res = invoke("check", "--repair", "--json", ok=False)
    data = json.loads(res.stdout)
    assert res.exit_code == 1 and data["removed"] == [str(orphan)] and data["damaged_versions"] == ["m:1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("show", "../../etc/passwd:1"), "path separator"),
        (("show", "m:0"), "whole number"),
        (("show", "m@prod"), "does not exist"),
        (("promote", "m:1", "--stage", "prod"), "not a stage"),
        (("delete", "m"), "delete needs one"),
        (("register", "/nonexistent", "--name", "m"), "no modelpress.json"),
        (("register", ".", "--name", "../up"), "path separator"),
        (("register", ".", "--name", "m", "-m", "spearman"), "NAME=NUMBER"),
        (("register", ".", "--name", "m", "--step", "{bad json"), "not valid JSON"),
        (("tag", "m:1", "   "), "not a valid tag"),
        (("list", "--registry", "sqlite://"), "in-memory"),
    ],
)
def test_input_errors_are_clear_and_exit_2(home, args, message):
    res = invoke(*args, ok=False)
    assert res.exit_code == 2 and "error:" in res.stderr and message in res.stderr, res.output
    assert res.stdout == ""


def test_registry_errors_are_clear_and_exit_2(cli):
    for args, message in [
        (("show", "ghost"), "no model named 'ghost'"),
        (("show", "m:9"), "has no version 9"),
        (("show", "m@production"), "No version of 'm' is in production"),
        (("rollback", "m"), "no version in production"),
        (("register", cli("x").path, "--name", "m", "--parent", "m:5"), "has no version 5"),
    ]:
        res = invoke(*args, ok=False)
        assert res.exit_code == 2 and "error:" in res.stderr and message in res.stderr and res.stdout == "", res.output


def test_an_empty_registry(backend):
    assert as_json("list") == []
    assert "registry is empty" in invoke("list").stderr
    res = invoke("show", "m", ok=False)
    assert res.exit_code == 2 and "registry is empty" in res.stderr
