"""Unstructured pruning, measured side by side in one run (issue 4: pruning targets).

1. Quality at 50% unstructured sparsity: magnitude, Wanda and SparseGPT (and each at 2:4) on
   the model the project trains itself (``shakespeare-lm``, perplexity on ``tinyshakespeare-test``)
   and on stories260K (perplexity on the TinyStories sample); both calibrated on
   ``tinyshakespeare-train`` (64 windows of 128 tokens), never on the text they are scored on.
   Target: SparseGPT or Wanda raises perplexity by at most half as much as magnitude pruning
   does, on shakespeare-lm (stories260K is reported next to it).
2. What the sparsity buys on this machine: the weights' size dense, as bitmask + values and
   zlib-compressed; the pruned model's speed against the dense one on PyTorch, ONNX Runtime and
   OpenVINO (both loaded together, measured in interleaved rounds, medians), next to the dense
   model measured against itself (the noise floor of a ratio on this machine); and PyTorch's own
   sparse CSR kernel against the dense matmul on the model's largest layer at 50%.
3. The Wanda-pruned model exported through the normal paths (ONNX and OpenVINO, with parity).

Exits non-zero when the target is missed. Settings: ``BENCH_THREADS`` (default 1: on the shared
2-core machine a second OpenMP thread spin-waits), ``BENCH_SECONDS`` per speed figure,
``PRUNE_BENCH_TOKENS`` (characters of tinyshakespeare-test scored; 0 = all 111,538).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _procs import LOAD_LOG, load_section
from rich.console import Console
from rich.table import Table

import modelpress as mp
from modelpress.bench.measure import SPEED_ROUNDS, BenchConfig, compare_speed, machine_info
from modelpress.locations import find_data_dir
from modelpress.optimize.techniques import apply_technique

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
EVAL_TOKENS = int(os.environ.get("PRUNE_BENCH_TOKENS", "0"))
TARGET_RATIO = 0.5  # the target: the best one-shot method's perplexity rise <= half of magnitude's
CALIBRATION = {"dataset": "tinyshakespeare-train", "samples": 64, "seq_len": 128}

METHODS = [
    ("magnitude", {"technique": "magnitude-prune", "sparsity": 0.5}),
    ("wanda", {"technique": "wanda", "sparsity": 0.5, "calibration": CALIBRATION}),
    ("sparsegpt", {"technique": "sparsegpt", "sparsity": 0.5, "calibration": CALIBRATION}),
    ("wanda, layer group", {"technique": "wanda", "sparsity": 0.5, "group": "layer", "calibration": CALIBRATION}),
    ("magnitude 2:4", {"technique": "magnitude-prune", "nm": "2:4"}),
    ("wanda 2:4", {"technique": "wanda", "nm": "2:4", "calibration": CALIBRATION}),
    ("sparsegpt 2:4", {"technique": "sparsegpt", "nm": "2:4", "calibration": CALIBRATION}),
]

console = Console(width=200)


def perplexity(art, data: str, data_dir: Path, tokens: int | None) -> float:
    options = {"max_eval_tokens": tokens} if tokens else None
    return mp.evaluate(art, data=data, data_dir=data_dir, threads=THREADS, task_options=options)["metrics"]["perplexity"]


def quality(name: str, source, data: str, data_dir: Path, work: Path, tokens: int | None) -> dict:
    dense = perplexity(source, data, data_dir, tokens)
    rows = {"dense": {"perplexity": dense}}
    arts = {}
    for label, step in METHODS:
        t0 = time.perf_counter()
        art = apply_technique(source, step, work / f"{name}-{label.replace(' ', '-').replace(':', '')}", data_dir=data_dir, threads=THREADS)
        seconds = time.perf_counter() - t0
        ppl = perplexity(art, data, data_dir, tokens)
        m = art.manifest.metrics["technique"]
        rows[label] = {"perplexity": ppl, "rise": ppl - dense, "sparsity": m["sparsity"], "prune_seconds": round(seconds, 1)}
        arts[label] = art
        console.print(
            f"  {name} {label}: perplexity {ppl:.4f} (dense {dense:.4f}), {m['sparsity']:.2%} of the decoder weights zero, "
            f"pruned in {seconds:.1f} s",
            highlight=False,
        )
    for label, r in rows.items():
        if label == "dense" or label.startswith("magnitude"):
            continue
        mag = rows["magnitude 2:4" if "2:4" in label else "magnitude"]["rise"]
        r["rise_vs_magnitude"] = r["rise"] / mag if mag > 0 else None
    return {"model": name, "dataset": data, "eval_tokens": tokens or "all", "rows": rows}, arts


def quality_table(res: dict) -> Table:
    table = Table(
        title=f"{res['model']}: perplexity on {res['dataset']} ({res['eval_tokens']} tokens), 50% of the decoder's linear weights zeroed",
        title_justify="left",
    )
    for col in ("method", "perplexity", "rise", "rise / magnitude's", "sparsity", "prune s"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for label, r in res["rows"].items():
        ratio = r.get("rise_vs_magnitude")
        table.add_row(
            label,
            f"{r['perplexity']:.4f}",
            "" if "rise" not in r else f"{r['rise']:+.4f}",
            "" if ratio is None else f"{ratio:.3f}",
            "" if "sparsity" not in r else f"{r['sparsity']:.2%}",
            "" if "prune_seconds" not in r else f"{r['prune_seconds']}",
        )
    return table


def csr_probe(art) -> dict:
    """PyTorch's sparse CSR matmul against the dense one, on the largest pruned layer (50% zeros)."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(art.path / "model.safetensors"))
    name, w = max(((k, v) for k, v in weights.items() if k.endswith("proj.weight")), key=lambda kv: kv[1].numel())
    x = torch.randn(8 * 128, w.shape[1])
    csr = w.to_sparse_csr()
    torch.set_num_threads(THREADS)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        deadline = time.perf_counter() + SECONDS
        while time.perf_counter() < deadline or len(times) < 5:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    with torch.inference_mode():
        dense_s = timed(lambda: torch.nn.functional.linear(x, w))
        sparse_s = timed(lambda: (csr @ x.T).T)
        err = float((torch.nn.functional.linear(x, w) - (csr @ x.T).T).abs().max())
    return {
        "layer": name,
        "shape": list(w.shape),
        "sparsity": float((w == 0).float().mean()),
        "dense_ms": dense_s * 1e3,
        "csr_ms": sparse_s * 1e3,
        "csr_speedup": dense_s / sparse_s,
        "max_abs_diff": err,
    }


def main() -> int:
    data_dir = find_data_dir()
    if data_dir is None:
        print("no data folder: set MODELPRESS_DATA (the benchmark scores real text)", file=sys.stderr)
        return 2
    from modelpress.cli.common import progress_bars
    from modelpress.zoo.shakespeare import ensure_trained

    with progress_bars() as prog:
        shakespeare = mp.load(str(ensure_trained(data_dir=data_dir, progress=prog)))
    stories = mp.load(str(data_dir / "models/stories260k"))
    work = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    report: dict = {"machine": machine_info(), "threads": THREADS, "calibration": CALIBRATION}

    console.print("[bold]1. quality at 50% sparsity[/bold]")
    res_sh, arts_sh = quality("shakespeare-lm", shakespeare, "tinyshakespeare-test", data_dir, work, EVAL_TOKENS or None)
    res_st, _ = quality("stories260k", stories, "tinystories", data_dir, work, None)
    report["quality"] = [res_sh, res_st]
    for res in (res_sh, res_st):
        console.print(quality_table(res))

    console.print("[bold]2. what it buys (the Wanda 50% shakespeare-lm against the dense one)[/bold]")
    pruned = arts_sh["wanda"]
    size = pruned.manifest.metrics["technique"]["size"]
    with load_section("speed of the pruned model against the dense one"):
        # The control first: the dense model against itself shows how far the machine's noise moves a ratio.
        speed_cfg = BenchConfig(batch_sizes=[8], seq_lens=[128], seconds=SECONDS, rounds=SPEED_ROUNDS)
        control = compare_speed(shakespeare, shakespeare, "torch", threads=THREADS, config=speed_cfg, data_dir=data_dir)
        control["runtime"] = "torch, dense vs dense (control)"
        speeds = [control]
        for runtime in ("torch", "onnxruntime", "openvino"):
            speeds.append(compare_speed(shakespeare, pruned, runtime, threads=THREADS, config=speed_cfg, data_dir=data_dir))
        probe = csr_probe(pruned)
    report.update({"size": size, "speed": speeds, "csr_probe": probe})
    buys = Table(title="what 50% unstructured sparsity buys here (measured in this run)", title_justify="left")
    for col in ("figure", "dense", "pruned", "ratio"):
        buys.add_column(col, justify="left" if col == "figure" else "right")
    d = size["dense_bytes"]
    buys.add_row("weights on disk: as written (dense)", f"{d:,} B", f"{d:,} B", "1.00x")
    buys.add_row("  stored as bitmask + values", f"{d:,} B", f"{size['bitmask_bytes']:,} B", f"{size['bitmask_bytes'] / d:.3f}x")
    buys.add_row("  dense, zlib", f"{d:,} B", f"{size['dense_zlib_bytes']:,} B", f"{size['dense_zlib_bytes'] / d:.3f}x")
    buys.add_row("  bitmask + values, zlib", f"{d:,} B", f"{size['bitmask_zlib_bytes']:,} B", f"{size['bitmask_zlib_bytes'] / d:.3f}x")
    for sp in speeds:
        lo, hi = sp["throughput_ratio_range"]
        buys.add_row(
            f"throughput, {sp['runtime']}, batch 8 x 128 (rounds: {lo:.2f}-{hi:.2f}x)",
            f"{sp['original_items_per_s']:.1f}/s",
            f"{sp['variant_items_per_s']:.1f}/s",
            f"{sp['throughput_ratio']:.3f}x",
        )
        lo, hi = sp["latency_ratio_range"]
        buys.add_row(
            f"latency p50, {sp['runtime']}, batch 1 (rounds: {lo:.2f}-{hi:.2f}x)",
            f"{sp['original_p50_ms']:.2f} ms",
            f"{sp['variant_p50_ms']:.2f} ms",
            f"{sp['latency_ratio']:.3f}x",
        )
    buys.add_row(
        f"torch CSR matmul vs dense, {probe['layer']} {probe['shape']}, 1024 tokens",
        f"{probe['dense_ms']:.3f} ms",
        f"{probe['csr_ms']:.3f} ms",
        f"{probe['csr_speedup']:.3f}x",
    )
    console.print(buys)

    console.print("[bold]3. exports of the pruned model (parity checked by modelpress.export)[/bold]")
    exports = {}
    for fmt in ("onnx", "openvino"):
        exp = mp.export(pruned, fmt, work / f"export-{fmt}")
        exports[fmt] = exp.manifest.metrics.get("parity_max_abs_diff")
        console.print(f"  {fmt}: {exp.path} parity {exports[fmt]}", highlight=False)
    report["exports"] = exports
    report["load_average"] = LOAD_LOG

    best = min(r["rise_vs_magnitude"] for label, r in res_sh["rows"].items() if "rise_vs_magnitude" in r and "2:4" not in label)
    report["target"] = {"best_rise_vs_magnitude": best, "threshold": TARGET_RATIO, "met": best <= TARGET_RATIO}
    out = Path(os.environ.get("BENCH_OUT", "out/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune.json").write_text(json.dumps(report, indent=2, default=str))
    verdict = "[green]met[/green]" if best <= TARGET_RATIO else "[red]MISSED[/red]"
    console.print(
        f"target on shakespeare-lm: best one-shot rise / magnitude's rise = {best:.3f} (<= {TARGET_RATIO}): {verdict}; "
        f"report {out / 'prune.json'}"
    )
    return 0 if best <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
