"""The serving benchmark's summary: medians over rounds, the markdown table, the targets, the files written."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _peers import PEER_VERSIONS
from _procs import busy_sections

FIGURES = ("rps", "p50_ms", "p99_ms", "server_cpu_ms", "loadgen_cpu_ms", "avg_batch", "model_rows_per_s", "model_busy")
# the targets (issue 17), on a quiet machine
IN_PROCESS_RATIO = 0.9  # served at the top concurrency / the same runner in process at its best batch
PEER_RATIO = {"litserve": 2.0, "ray": 4.0}  # ours / peer at the top concurrency, with p99 no higher than theirs
FLOOR_RATIO = 1.0  # ours / the plain FastAPI batcher, at every concurrency
C1_P50_SLACK_MS = 1.0  # served p50 at concurrency 1 within this of the in-process p50 at batch 1


def label(name: str, info: dict[str, Any]) -> str:
    peer = PEER_VERSIONS.get(name, "").replace("==", " ").replace("[serve]", " Serve")
    return {
        "ours": "modelpress serve (bucketing)",
        "longest": "modelpress serve, padded to each batch's longest",
        "pad128": "modelpress serve, padded to 128",
        "floor": "floor: FastAPI + asyncio batcher",
        "litserve": f"LitServe {peer.split()[-1] if peer else ''}".strip(),
        "ray": f"Ray Serve {peer.split()[-1] if peer else ''}".strip(),
    }.get(name) or f"modelpress serve, {info.get('instances')} instance(s) x {info.get('threads_per_instance')} thread(s)"


def median_of(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """A figure's median over the rounds, with the status counts and requests summed."""
    runs = [r[key] for r in rounds if key in r]
    statuses: Counter = Counter()
    for run in runs:
        statuses.update(run["statuses"])
    out = {k: float(np.median([run[k] for run in runs])) for k in FIGURES if all(k in run for run in runs)}
    return out | {"statuses": dict(statuses), "requests": sum(run["requests"] for run in runs)}


def _f(x: float | None, spec: str = ".1f") -> str:
    return "" if x is None else format(x, spec)


def summarize(report: dict[str, Any], top: int) -> str:
    """Fill ``report["summary"]``, print the markdown table and the targets, and return the markdown."""
    rounds = report["rounds"]
    lat = {k: float(np.median([r["in_process"]["latency_ms"][k] for r in rounds])) for k in ("p50_ms", "p99_ms")}
    batches = list(rounds[0]["in_process"]["throughput"])
    thr = {
        bs: {k: float(np.median([r["in_process"]["throughput"][bs][k] for r in rounds])) for k in ("rows_per_s", "cpu_ms_per_row")}
        for bs in batches
    }
    best = max(thr, key=lambda bs: thr[bs]["rows_per_s"])
    order = list(report["targets"])
    keys = sorted({k for r in rounds for k in r if k != "in_process"}, key=lambda k: (order.index(k.split("@")[0]), int(k.split("@")[1])))
    served = {k: median_of(rounds, k) for k in keys}
    report["summary"] = {"in_process": {"latency_ms": lat, "throughput": thr, "best_batch": best}, "served": served}
    s = report["settings"]
    busy = busy_sections()
    title = (
        f"MiniLM, {s['runtime']} fp32, {s['threads']} threads, STS-B sentences, max batch {s['max_batch_size']}, "
        f"{s['max_queue_delay_ms']:g} ms wait, median of {len(rounds)} round(s)"
    )
    lines = [f"`{s['command']}` ({title}; load average before: {' '.join(f'{x:.2f}' for x in report['load_average_before'])})", ""]
    if s.get("quick"):
        lines += ["**QUICK RUN: for A/B checks while developing, not for the docs**", ""]
    if busy:
        lines += [f"**MEASURED BESIDE OTHER LOAD (1-min load average above 1 before: {', '.join(busy)})**", ""]
    lines += [
        "| what | concurrency | req/s | p50 ms | p99 ms | server CPU ms/req | load gen CPU ms/req | batch rows, model busy |",
        "|---|---|---|---|---|---|---|---|",
        f"| in process, batch {best} (best of {'/'.join(map(str, batches))}) | | {thr[best]['rows_per_s']:.0f} rows/s | | "
        f"| {thr[best]['cpu_ms_per_row']:.2f} per row | | |",
        f"| in process, batch 1 | 1 | {thr[1]['rows_per_s']:.0f} rows/s | {lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} "
        f"| {thr[1]['cpu_ms_per_row']:.2f} per row | | |"
        if 1 in thr
        else "",
    ]
    for key, r in served.items():
        name, _, conc = key.partition("@")
        what = label(name, report["targets"][name])
        batch = f"{r['avg_batch']:.1f}, {r['model_busy']:.0%}" if "avg_batch" in r else ""
        lines.append(
            f"| {what} | {conc} | {r['rps']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {_f(r.get('server_cpu_ms'), '.2f')} "
            f"| {_f(r.get('loadgen_cpu_ms'), '.3f')} | {batch} |"
        )
    lines = [ln for ln in lines if ln]
    checks = targets(report, top, served, thr[best]["rows_per_s"], lat["p50_ms"])
    report["summary"]["checks"] = checks
    lines += ["", *[f"- {c['text']}" for c in checks]]
    markdown = "\n".join(lines) + "\n"
    print("\n" + markdown, flush=True)
    return markdown


def targets(report: dict[str, Any], top: int, served: dict[str, Any], in_process_rps: float, in_process_p50: float) -> list[dict[str, Any]]:
    """Each target of issue 17 with its figure and whether it was met; info lines (no target) have ``ok`` None."""
    out: list[dict[str, Any]] = []

    def _fig(served: dict[str, Any], name: str, c: int) -> dict[str, Any] | None:
        return served.get(f"{name}@{c}")

    def add(text: str, ok: bool | None) -> None:
        out.append({"text": text + ("" if ok is None else (": ok" if ok else ": MISSED")), "ok": ok})

    ours_top = _fig(served, "ours", top)
    concs = report["settings"]["concurrency"]
    if ours_top:
        x = ours_top["rps"] / in_process_rps
        add(
            f"served at concurrency {top}: {x:.2f}x the runner in process at its best batch (target >= {IN_PROCESS_RATIO})",
            x >= IN_PROCESS_RATIO,
        )
        for peer, need in PEER_RATIO.items():
            theirs = _fig(served, peer, top)
            if theirs:
                x = ours_top["rps"] / theirs["rps"]
                p99 = ours_top["p99_ms"] <= theirs["p99_ms"]
                add(
                    f"ours {x:.2f}x {label(peer, {})} at concurrency {top} (target >= {need:g}), "
                    f"p99 {ours_top['p99_ms']:.0f} vs {theirs['p99_ms']:.0f} ms (target: no higher)",
                    x >= need and p99,
                )
    floor = [(c, _fig(served, "ours", c), _fig(served, "floor", c)) for c in concs]
    floor = [(c, o["rps"] / f["rps"]) for c, o, f in floor if o and f]
    if floor:
        ok = all(x >= FLOOR_RATIO for _, x in floor)
        add(f"ours vs the floor: {', '.join(f'{x:.2f}x at {c}' for c, x in floor)} (target >= {FLOOR_RATIO:g} at every concurrency)", ok)
    one = _fig(served, "ours", 1)
    if one:
        gap = one["p50_ms"] - in_process_p50
        add(
            f"p50 at concurrency 1: {one['p50_ms']:.2f} ms served vs {in_process_p50:.2f} ms in process at batch 1, "
            f"{gap:+.2f} ms (target within {C1_P50_SLACK_MS:g} ms)",
            gap <= C1_P50_SLACK_MS,
        )
    for other, what in (("longest", "padding each batch to its longest"), ("pad128", "padding every batch to 128")):
        pairs = [(c, _fig(served, "ours", c), _fig(served, other, c)) for c in concs]
        pairs = [(c, o["rps"] / p["rps"]) for c, o, p in pairs if o and p]
        if pairs:
            add(f"bucketing vs {what}: {', '.join(f'{x:.2f}x at {c}' for c, x in pairs)}", None)
    inst = sorted((info["instances"], _fig(served, name, top)) for name, info in report["targets"].items() if "instances" in info)
    inst = [(n, r) for n, r in inst if r]
    if inst:
        base = inst[0][1]["rps"]
        add(
            f"model instances at concurrency {top}: "
            + ", ".join(f"{n}: {r['rps']:.1f} req/s ({r['rps'] / base:.2f}x), {r['server_cpu_ms']:.2f} CPU ms/req" for n, r in inst),
            None,
        )
    return out


def write_results(out: Path, report: dict[str, Any], markdown: str) -> None:
    """``serving.json`` and ``serving.md`` under ``out``, each written to a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("serving.json", json.dumps(report, indent=2, default=str)), ("serving.md", markdown)):
        tmp = out / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
