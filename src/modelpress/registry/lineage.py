"""Lineage trees: from the original version to every descendant, with each step and metric change.

:func:`build_tree` works on plain data (nodes and edges loaded by the registry), so the tree is
a JSON-able dict; :func:`render_tree` turns it into a Rich tree for the CLI.
"""

from __future__ import annotations

from typing import Any

from modelpress.registry.records import metric_kind


def metric_changes(parent: dict[str, float], child: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """For each metric both have: the parent's value, the child's, the difference and the relative change."""
    out: dict[str, dict[str, float | None]] = {}
    for name, new in child.items():
        if name in parent:
            old = parent[name]
            out[name] = {"from": old, "to": new, "delta": new - old, "relative": (new - old) / abs(old) if old else None}
    return out


def build_tree(focus: int, nodes: dict[int, dict[str, Any]], edges: list[tuple[int, int, str | None, dict | None]]) -> dict[str, Any]:
    """The tree that holds ``focus``: from its original (following first parents up) down to every descendant.

    ``nodes`` maps a version id to its facts (ref, name, version, stage, content_hash, metrics as
    {name: latest value}); ``edges`` are (parent_id, child_id, step, config) in creation order.
    """
    parents: dict[int, list[tuple[int, str | None, dict | None]]] = {}
    children: dict[int, list[tuple[int, str | None, dict | None]]] = {}
    for parent_id, child_id, step, config in edges:
        if parent_id in nodes and child_id in nodes:
            parents.setdefault(child_id, []).append((parent_id, step, config))
            children.setdefault(parent_id, []).append((child_id, step, config))

    root, seen = focus, {focus}
    while root in parents:
        up = parents[root][0][0]
        if up in seen:  # pragma: no cover - a cycle cannot be registered (a parent exists first)
            break
        seen.add(up)
        root = up

    def node(vid: int, step: str | None, config: dict | None, parent_metrics: dict[str, float] | None, path: set[int]) -> dict[str, Any]:
        facts = nodes[vid]
        data = {
            **facts,
            "step": step,
            "config": config,
            "changes": metric_changes(parent_metrics, facts["metrics"]) if parent_metrics is not None else {},
            "focus": vid == focus,
            "other_parents": [nodes[p]["ref"] for p, _, _ in parents.get(vid, [])[1:]],
            "children": [],
        }
        for child_id, child_step, child_config in children.get(vid, []):
            if child_id not in path:
                data["children"].append(node(child_id, child_step, child_config, facts["metrics"], path | {child_id}))
        return data

    return {"focus": nodes[focus]["ref"], "root": node(root, None, None, None, {root})}


def key_changes(changes: dict[str, dict[str, Any]], limit: int = 2) -> list[str]:
    """One line per key metric: the first shared quality metric and the first shared speed metric."""
    picked: list[str] = []
    for want in ("quality", "speed"):
        for name in changes:
            if metric_kind(name) == want:
                picked.append(name)
                break
    lines = []
    for name in picked[:limit]:
        c = changes[name]
        rel = f" ({c['relative'] * 100:+.1f}%)" if c.get("relative") is not None else ""
        lines.append(f"{name} {_fmt(c['from'])} -> {_fmt(c['to'])}{rel}")
    return lines


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _label(n: dict[str, Any]) -> str:
    from rich.markup import escape

    stage_color = {"production": "green", "staging": "yellow", "candidate": "cyan", "archived": "dim"}.get(n["stage"], "white")
    head = f"[bold]{escape(n['ref'])}[/bold] [{stage_color}]{n['stage']}[/{stage_color}] [dim]{n['content_hash'][:12]}[/dim]"
    if n.get("focus"):
        head += " [magenta]<-[/magenta]"
    parts = [head]
    if n.get("step") or n.get("config"):
        cfg = n.get("config") or {}
        shown = ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("technique", "type", "name") and not isinstance(v, dict | list))
        parts.append(f"  step: [blue]{escape(n.get('step') or '?')}[/blue]" + (f" ({escape(shown)})" if shown else ""))
    changes = key_changes(n.get("changes") or {})
    if changes:
        parts.append("  " + escape("; ".join(changes)))
    elif n.get("metrics") and not n.get("changes"):
        first = list(n["metrics"].items())[:2]
        parts.append("  " + escape(", ".join(f"{k} {_fmt(v)}" for k, v in first)))
    if n.get("other_parents"):
        parts.append(f"  [dim]also from {escape(', '.join(n['other_parents']))}[/dim]")
    return "\n".join(parts)


def render_tree(tree: dict[str, Any]) -> Any:
    """A ``rich.tree.Tree`` of a :func:`build_tree` result."""
    from rich.tree import Tree

    def add(parent: Any, n: dict[str, Any]) -> None:
        branch = parent.add(_label(n))
        for child in n["children"]:
            add(branch, child)

    root = tree["root"]
    top = Tree(_label(root))
    for child in root["children"]:
        add(top, child)
    return top
