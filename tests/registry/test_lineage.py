"""Lineage on each backend: the tree from the original to every descendant, steps and metric changes."""

import json

import pytest
from rich.console import Console

from modelpress.registry.lineage import build_tree, key_changes, metric_changes, render_tree


@pytest.fixture
def family(registry, make_artifact):
    """m:1 original -> m:2 int8 -> m:4 pruned; m:1 -> m:3 bf16. And an unrelated m:5."""
    reg = registry
    reg.register(make_artifact("orig"), "m", metrics={"spearman": 0.80, "latency_ms": 10.0})
    reg.register(
        make_artifact("int8"), "m", parent="m:1", step={"technique": "quantize", "bits": 8}, metrics={"spearman": 0.78, "latency_ms": 4.0}
    )
    reg.register(
        make_artifact("bf16"),
        "m",
        parent="m:1",
        step={"technique": "precision", "dtype": "bf16"},
        metrics={"spearman": 0.80, "latency_ms": 5.0},
    )
    reg.register(make_artifact("pruned"), "m", parent="m:2", step={"technique": "prune", "amount": 0.5}, metrics={"spearman": 0.70})
    reg.register(make_artifact("alone"), "m")
    return reg


def refs(node):
    return [node["ref"], [refs(c) for c in node["children"]]]


def test_tree_from_any_member_starts_at_the_original(family):
    for focus in ("m:1", "m:2", "m:4", "m:3"):
        tree = family.lineage(focus)
        assert tree["focus"] == focus
        assert refs(tree["root"]) == ["m:1", [["m:2", [["m:4", []]]], ["m:3", []]]]
    assert refs(family.lineage("m")["root"]) == ["m:5", []]  # the latest has no family


def test_nodes_carry_steps_and_metric_changes(family):
    root = family.lineage("m:4")["root"]
    int8 = root["children"][0]
    assert int8["step"] == "quantize" and int8["config"] == {"technique": "quantize", "bits": 8}
    assert int8["changes"]["latency_ms"]["from"] == 10.0 and int8["changes"]["latency_ms"]["to"] == 4.0
    assert int8["changes"]["spearman"]["delta"] == pytest.approx(-0.02)
    assert int8["changes"]["latency_ms"]["relative"] == pytest.approx(-0.6)
    pruned = int8["children"][0]
    assert pruned["focus"] and not int8["focus"] and set(pruned["changes"]) == {"spearman"}
    assert root["changes"] == {} and root["step"] is None
    json.dumps(root)  # JSON-able as the CLI prints it


def test_rich_tree_shows_steps_and_key_changes(family):
    console = Console(record=True, width=200)
    console.print(render_tree(family.lineage("m:2")))
    text = console.export_text()
    assert "m:1" in text and "step: quantize (bits=8)" in text and "prune" in text
    assert "spearman 0.8 -> 0.78 (-2.5%)" in text and "latency_ms 10 -> 4 (-60.0%)" in text


def test_a_deleted_middle_version_splits_the_tree(family):
    family.delete("m:2", force=True)
    assert refs(family.lineage("m:4")["root"]) == ["m:4", []]
    assert refs(family.lineage("m:1")["root"]) == ["m:1", [["m:3", []]]]


def test_lineage_across_model_names(registry, make_artifact):
    registry.register(make_artifact("orig"), "teacher")
    registry.register(make_artifact("small"), "student", parent="teacher:1", step={"technique": "distill"})
    assert refs(registry.lineage("student")["root"]) == ["teacher:1", [["student:1", []]]]


def test_build_tree_with_two_parents():
    nodes = {i: {"ref": f"m:{i}", "stage": "candidate", "content_hash": "0" * 64, "metrics": {}} for i in (1, 2, 3)}
    tree = build_tree(3, nodes, [(1, 3, "merge", None), (2, 3, "merge", None)])
    assert tree["root"]["ref"] == "m:1" and tree["root"]["children"][0]["other_parents"] == ["m:2"]


def test_metric_helpers():
    changes = metric_changes({"acc": 0.0, "latency_ms": 2.0}, {"acc": 0.5, "latency_ms": 1.0, "new": 1.0})
    assert changes["acc"]["relative"] is None and set(changes) == {"acc", "latency_ms"}
    assert key_changes(changes) == ["acc 0 -> 0.5", "latency_ms 2 -> 1 (-50.0%)"]
