"""Distillation and structured pruning (issue 4 targets), quality and speed measured side by side in one run.

1. all-MiniLM-L6-v2 distilled into 3 of its layers (0, 3, 5) on unlabeled text (STS-B train and
   SST-2 train sentences, never the STS-B dev split it is scored on), within a 10-minute training
   budget, then int8 (a recipe: distill, then OpenVINO + NNCF static int8; and ONNX Runtime
   dynamic int8 per channel). Targets: the student keeps >= 97% of the teacher's STS-B Spearman
   (dev) at >= 1.8x the teacher's throughput on the same runtime (PyTorch eager, and OpenVINO),
   and student + int8 reaches >= 8x PyTorch fp32 eager (batch 32 x 128 tokens, 2 threads).
2. The zoo's MNIST CNN with 50% of its channels pruned (Torch-Pruning) and fine-tuned: >= 99% of
   its accuracy on MNIST test at >= 1.5x its throughput (PyTorch eager, 2 threads; the target is
   read at batch 256, where the convolutions rather than per-call overhead dominate; batch 1 and
   32 are printed too).

Trained models are cached (``modelpress.locations.cache_dir``): the student and the fine-tuned
CNN are trained on the first run only. Exits 1 when a target is missed.
Timing: every model is loaded and warmed up, then timed in BENCH_ROUNDS interleaved rounds of
BENCH_CALLS batches each (a model's figure is the median over rounds of each round's median), so a burst of load from
other processes slows one round of every model rather than one model's whole figure.
Every figure is measured at BENCH_THREADS and at 1 thread. The targets are read at BENCH_THREADS,
unless the machine is busy (load average at or above its core count when timing starts): then
multi-threaded figures mostly measure OpenMP threads waiting for a descheduled peer (a 0.2 ms
MNIST call took 55 ms at the 90th percentile with 2 threads at load 5 on 2 cores, and 0.2 ms with
1), so the targets are read at 1 thread, and the output says so.
Environment: BENCH_THREADS (2), BENCH_ROUNDS (8), BENCH_CALLS (3), BENCH_OUT (out/bench).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from _procs import LOAD_LOG, load_section
from rich.console import Console
from rich.table import Table

import modelpress as mp
from modelpress.bench.measure import machine_info
from modelpress.cli.common import progress_bars
from modelpress.locations import find_data_dir

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
OUT = Path(os.environ.get("BENCH_OUT", "out/bench"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "8"))  # interleaved rounds over every model; the median round counts
CALLS = int(os.environ.get("BENCH_CALLS", "3"))  # batches per model per round; their median is the round's figure

DISTILL = {"technique": "distill", "layers": 3, "training": {"max_steps": 2000, "max_seconds": 600, "lr": 1e-4, "eval_every": 250}}
OV_INT8 = {"technique": "static-int8", "runtime": "openvino", "precision_hint": "bf16"}  # PEERS.md: NNCF static int8, bf16 hint
PRUNE = {"technique": "structured-prune", "ratio": 0.5, "finetune": {"max_steps": 600, "max_seconds": 300, "lr": 2e-3, "eval_every": 100}}
TARGETS = {"student_recovery": 0.97, "student_speedup": 1.8, "int8_speedup": 8.0, "cnn_recovery": 0.99, "cnn_speedup": 1.5}

console = Console(width=180)


def busy() -> bool:
    """Load average at or above the core count: another job holds the cores."""
    return os.getloadavg()[0] >= (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def timed(
    rows: list[tuple[str, object, str, dict]], batch_sizes: tuple[int, ...], seq_len: int | None, ddir: Path | None, prog
) -> dict[int, dict[str, dict[int, float]]]:
    """{threads: {label: {batch: items/s}}} at THREADS and at 1 thread: every model loaded, then timed in interleaved rounds.

    The one timing of modelpress (:func:`modelpress.bench.measure.time_interleaved`): CALLS batches per
    model per round (their median is the round's figure), a model's figure the median over rounds.
    """
    from modelpress.bench.measure import BenchConfig, time_interleaved
    from modelpress.runtimes import create_runner
    from modelpress.tasks import task_for

    # seconds ~0 and min_iters CALLS: exactly CALLS timed calls per figure per round
    cfg = BenchConfig(batch_sizes=list(batch_sizes), seq_lens=[seq_len or 128], rounds=ROUNDS, seconds=1e-6, min_iters=CALLS)
    out: dict[int, dict[str, dict[int, float]]] = {}
    for t in dict.fromkeys((THREADS, 1)):
        runners = [create_runner(mp.load(art) if isinstance(art, str) else art, rt, threads=t, **opts) for _, art, rt, opts in rows]
        try:
            timings = time_interleaved(runners, task_for(runners[0].artifact), cfg, data_dir=ddir, latency=False, progress=None)
        finally:
            for r in runners:
                r.close()
        out[t] = {
            label: {row["batch"]: row["items_per_s"] for row in tm["throughput"]} for (label, *_), tm in zip(rows, timings, strict=True)
        }
    return out


def judged(speed: dict[int, dict], was_busy: bool) -> tuple[int, str]:
    """Which thread setting the targets are read at, and why."""
    if was_busy and 1 in speed and THREADS != 1:
        return (
            1,
            f"the machine was busy (load {os.getloadavg()[0]:.1f}): {THREADS}-thread figures are dominated by OpenMP threads "
            "waiting for a descheduled peer, so targets are read at 1 thread",
        )
    return THREADS, f"targets read at {THREADS} threads"


def minilm(ddir: Path, prog) -> tuple[dict, list[str]]:
    from modelpress.optimize.api import apply_technique, optimize
    from modelpress.optimize.evaluation import Evaluator

    teacher = mp.load("minilm")
    t0 = time.perf_counter()
    recipe = {"name": "distill-then-int8", "gate": {"spearman": {"min_recovery": TARGETS["student_recovery"]}}, "steps": [DISTILL, OV_INT8]}
    res = optimize(teacher, recipe, OUT / "distill-recipe", data="stsb-dev", data_dir=ddir, threads=THREADS, overwrite=True, progress=prog)
    recipe_s = time.perf_counter() - t0
    problems = [f"recipe step {s.index} ({s.label}) not shipped: {s.error or s.gate.summary()}" for s in res.steps if not s.shipped]
    if problems:
        return {"recipe": res.to_json()}, problems
    student = mp.artifacts.Artifact.open(res.steps[0].path)
    ov_int8 = mp.artifacts.Artifact.open(res.steps[1].path)
    ort_int8 = apply_technique(
        student, {"technique": "dynamic-int8", "runtime": "onnxruntime", "per_channel": True}, OUT / "distill-ort-int8", overwrite=True
    )
    # The peer's best recipe on the teacher itself (PEERS.md: 6.45x on a quiet machine): shows how busy this one is.
    teacher_int8 = apply_technique(teacher, OV_INT8, OUT / "teacher-ov-int8", overwrite=True, data_dir=ddir)
    ev = Evaluator(teacher, data="stsb-dev", data_dir=ddir, threads=THREADS)
    quality = {
        "teacher (torch fp32)": ev.original_result()["metrics"]["spearman"],
        "student (torch fp32)": res.steps[0].evaluation["metrics"]["spearman"],
        "student + static int8 (openvino)": res.steps[1].evaluation["metrics"]["spearman"],
        "student + dynamic int8 per-channel (onnxruntime)": ev.evaluate(ort_int8, "onnxruntime")["metrics"]["spearman"],
    }
    rows = [
        ("teacher torch fp32 eager", teacher, "torch", {}),
        ("student torch fp32 eager", student, "torch", {}),
        ("teacher openvino", teacher, "openvino", {}),
        ("student openvino", student, "openvino", {}),
        ("student + static int8 (openvino)", ov_int8, "openvino", {}),
        ("student + dynamic int8 per-channel (onnxruntime)", ort_int8, "onnxruntime", {}),
        ("teacher + static int8 (openvino), the peer recipe", teacher_int8, "openvino", {}),
    ]
    was_busy = busy()
    with load_section("MiniLM teacher/student speed"):
        speeds = timed(rows, (32,), 128, ddir, prog)
    qkey = {
        "teacher torch fp32 eager": "teacher (torch fp32)",
        "student torch fp32 eager": "student (torch fp32)",
        "student + static int8 (openvino)": "student + static int8 (openvino)",
        "student + dynamic int8 per-channel (onnxruntime)": "student + dynamic int8 per-channel (onnxruntime)",
    }
    for threads, speed in speeds.items():
        base = speed["teacher torch fp32 eager"][32]
        table = Table(
            title=f"MiniLM -> 3-layer student (batch 32 x 128 tokens, {threads} thread(s); ratios to the teacher on PyTorch fp32 eager, "
            f"same run, median of {ROUNDS} interleaved rounds)",
            title_justify="left",
        )
        for col in ("model", "STS-B dev Spearman", "recovery", "items/s", "speed-up"):
            table.add_column(col)
        for label, entry in speed.items():
            q = quality.get(qkey.get(label, ""))
            rec = q / quality["teacher (torch fp32)"] if q is not None else None
            table.add_row(
                label, f"{q:.4f}" if q is not None else "", f"{rec:.4f}" if rec else "", f"{entry[32]:.1f}", f"{entry[32] / base:.2f}x"
            )
        console.print(table)
    tm = student.manifest.metrics["technique"]
    tr = tm["training"]
    console.print(
        f"distillation: {tr['steps']} steps in {tr['seconds']:.0f} s ({'cached' if tm.get('cached') else 'trained in this run'}), "
        f"stopped: {tr['stopped']}; held-out STS-B train Spearman {tr['first_metric']:.4f} (layers 0, 3, 5 untrained) "
        f"-> {tr['best_metric']:.4f}; recipe took {recipe_s:.0f} s"
    )
    at, why = judged(speeds, was_busy)
    console.print(why)
    speed = speeds[at]
    base = speed["teacher torch fp32 eager"][32]
    rec = quality["student (torch fp32)"] / quality["teacher (torch fp32)"]
    same_torch = speed["student torch fp32 eager"][32] / base
    same_ov = speed["student openvino"][32] / speed["teacher openvino"][32]
    best_int8 = max(speed[k][32] for k in speed if "int8" in k and k.startswith("student")) / base
    figures = {
        "quality": quality,
        "speed": speeds,
        "judged_at_threads": at,
        "student_recovery": rec,
        "student_speedup_torch": same_torch,
        "student_speedup_openvino": same_ov,
        "int8_speedup": best_int8,
        "training": tr,
    }
    if rec < TARGETS["student_recovery"]:
        problems.append(f"student keeps {rec:.4f} of the teacher's Spearman < {TARGETS['student_recovery']}")
    if same_torch < TARGETS["student_speedup"] or same_ov < TARGETS["student_speedup"]:
        problems.append(
            f"student speed-up torch {same_torch:.2f}x / openvino {same_ov:.2f}x < {TARGETS['student_speedup']}x ({at} thread(s))"
        )
    if best_int8 < TARGETS["int8_speedup"]:
        problems.append(f"student + int8 {best_int8:.2f}x PyTorch fp32 eager < {TARGETS['int8_speedup']}x ({at} thread(s))")
    for k, v in quality.items():
        if "int8" in k and v / quality["teacher (torch fp32)"] < TARGETS["student_recovery"]:
            problems.append(f"{k} keeps {v / quality['teacher (torch fp32)']:.4f} < {TARGETS['student_recovery']}")
    return figures, problems


def mnist(ddir: Path, prog) -> tuple[dict, list[str]]:
    from modelpress.optimize.api import compress

    cnn = mp.load("mnist-cnn")
    res = compress(
        cnn, PRUNE, OUT / "mnist-pruned", data="mnist-test", data_dir=ddir, threads=THREADS, bench=False, overwrite=True, progress=prog
    )
    pruned = res.artifact
    was_busy = busy()
    with load_section("MNIST CNN speed"):
        speeds = timed(
            [("mnist-cnn", cnn, "torch", {}), ("mnist-cnn 50% channels pruned", pruned, "torch", {})], (1, 32, 256), None, ddir, prog
        )
    base, var = res.original["metrics"]["accuracy"], res.variant["metrics"]["accuracy"]
    m = res.technique
    for threads, speed in speeds.items():
        a, b = speed["mnist-cnn"], speed["mnist-cnn 50% channels pruned"]
        table = Table(
            title=f"MNIST CNN, 50% of channels pruned + fine-tuned (PyTorch eager, {threads} thread(s), same run, "
            f"median of {ROUNDS} interleaved rounds)",
            title_justify="left",
        )
        for col in ("model", "widths", "parameters", "MNIST test accuracy", "items/s b1 / b32 / b256", "speed-up b1 / b32 / b256"):
            table.add_column(col)
        table.add_row(
            "mnist-cnn",
            str(m["widths_before"]),
            f"{m['parameters_before']:,}",
            f"{base:.4f}",
            " / ".join(f"{a[k]:.0f}" for k in (1, 32, 256)),
            "1.00x",
        )
        table.add_row(
            "pruned + fine-tuned",
            str(m["widths_after"]),
            f"{m['parameters_after']:,}",
            f"{var:.4f} ({var / base:.4f})",
            " / ".join(f"{b[k]:.0f}" for k in (1, 32, 256)),
            " / ".join(f"{b[k] / a[k]:.2f}x" for k in (1, 32, 256)),
        )
        console.print(table)
    ft = m["finetune"]["training"]
    console.print(
        f"fine-tuning: {ft['steps']} steps in {ft['seconds']:.0f} s ({'cached' if m.get('cached') else 'trained in this run'}); "
        f"held-out accuracy {ft['first_metric']:.4f} (pruned) -> {ft['best_metric']:.4f}"
    )
    at, why = judged(speeds, was_busy)
    console.print(why)
    a, b = speeds[at]["mnist-cnn"], speeds[at]["mnist-cnn 50% channels pruned"]
    problems = []
    if var / base < TARGETS["cnn_recovery"]:
        problems.append(f"pruned CNN keeps {var / base:.4f} of its accuracy < {TARGETS['cnn_recovery']}")
    if b[256] / a[256] < TARGETS["cnn_speedup"]:
        problems.append(f"pruned CNN {b[256] / a[256]:.2f}x at batch 256 < {TARGETS['cnn_speedup']}x ({at} thread(s))")
    return {
        "accuracy": {"original": base, "pruned": var},
        "speed": speeds,
        "judged_at_threads": at,
        "widths": m["widths_after"],
        "finetune": ft,
    }, problems


def main() -> int:
    ddir = find_data_dir()
    if ddir is None:
        print("distill_bench: the shared data folder is absent (set MODELPRESS_DATA); nothing measured.")
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine_info(), "threads": THREADS}
    problems: list[str] = []
    with progress_bars(sys.stderr.isatty()) as prog:
        for name, fn in (("minilm", minilm), ("mnist", mnist)):
            figures, missed = fn(ddir, prog)
            report[name] = figures
            problems += missed
    report["missed"] = problems
    report["load_average"] = LOAD_LOG
    (OUT / "distill.json").write_text(json.dumps(report, indent=2, default=str))
    for p in problems:
        console.print(f"[bold red]target missed:[/bold red] {p}")
    if not problems:
        console.print("[green]all distillation and structured-pruning targets met[/green]")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
