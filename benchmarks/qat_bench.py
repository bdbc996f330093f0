"""QAT against post-training quantization at the same bit width: float, PTQ and QAT accuracy, and
the share of PTQ's loss that QAT wins back (issue 16, item 4).

Two settings per model:

* ``int8``: the artifacts a recipe ships. One branch recipe (the same gate, the same evaluation)
  with ``static-int8`` on ``--runtime`` and ``qat`` converted by that same ``static-int8`` step:
  both artifacts are evaluated by the runtime's runner on the scored split.
* ``w4a8``: a harder setting, used when int8 loses nothing measurable: 4-bit weights per tensor
  (symmetric) and 8-bit activations per tensor, on every Conv/Linear, PT2E with the X86 quantizer
  (post-training: calibrated min/max weights and histogram activations; QAT: the same grid
  fake-quantized while fine-tuning). No runtime format of the project stores 4-bit static
  weights, so this setting is measured in process on the converted PT2E graph (eager torch),
  not as an artifact.

recovered = (QAT - PTQ) / (float - PTQ), shown only where PTQ lost at least ``MIN_LOSS``.

    .venv/bin/python benchmarks/qat_bench.py --model mnist-cnn --runtime onnxruntime
    .venv/bin/python benchmarks/qat_bench.py --model minilm-sst2 --runtime onnxruntime --steps 300
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIN_LOSS = 0.002  # a PTQ loss below 0.2 points is within the noise of one calibration draw on these test sets
EVAL = {"mnist-cnn": "mnist-test", "minilm-sst2": "sst2-dev"}


def int8_rows(
    art: Any, runtime: str, steps: int, lr: float, limit: int | None, threads: int, progress: Any, max_seconds: float | None = None
) -> dict[str, Any]:
    from modelpress.optimize.recipe import run_recipe

    extra = {"compile": False} if runtime == "torch" else {}
    ptq = {"technique": "static-int8", "runtime": runtime, "per_channel": True, "calibration": {"samples": 256}, **extra}
    qat = {
        "technique": "qat",
        "runtime": runtime,
        "quantize": {k: v for k, v in ptq.items() if k not in ("technique", "runtime")} | {"technique": "static-int8"},
        "training": {"max_steps": steps, "lr": lr, **({"max_seconds": max_seconds} if max_seconds else {})},
    }
    # the gate only records: both variants are kept and scored whatever they lose
    recipe = {"mode": "branch", "on_failure": "skip", "gate": {"accuracy": {"min_recovery": 0.01}}, "steps": [ptq, qat]}
    with tempfile.TemporaryDirectory() as tmp:
        res = run_recipe(art, recipe, Path(tmp) / "out", data=EVAL[art.name], limit=limit, threads=threads, progress=progress)
    out: dict[str, Any] = {"float": res.original["metrics"]["accuracy"], "examples": res.original["metrics"].get("examples")}
    for step, key in zip(res.steps, ("ptq", "qat"), strict=True):
        if step.error:
            raise SystemExit(f"{key}: {step.error}")
        out[key] = step.evaluation["metrics"]["accuracy"]
        if key == "qat":
            out["training"] = {
                k: step.technique["qat"]["training"][k] for k in ("steps", "seconds", "stopped", "best_step", "first_metric", "best_metric")
            }
    return out


def w4a8_rows(art: Any, steps: int, lr: float, limit: int | None, threads: int, progress: Any) -> dict[str, Any]:
    """PTQ and QAT at 4-bit per-tensor weights, 8-bit activations, scored in process on the converted graph."""
    import torch
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from modelpress.datasets import load_dataset
    from modelpress.optimize.configs.quantize import QATTraining
    from modelpress.optimize.quantize import qat as q
    from modelpress.optimize.quantize import qat_prepare as qp
    from modelpress.optimize.train.loop import train
    from modelpress.optimize.train.objectives import ModuleRunner, Objective
    from modelpress.tasks import task_for

    torch.set_num_threads(threads)
    task = task_for(art)
    test = load_dataset(EVAL[art.name], limit=limit)
    module, _hf, sig = q._float_module(art)
    names, outs = list(sig.input_names), list(sig.output_names)
    spec = QATTraining(max_steps=steps, lr=lr)
    data = q.training_data(task, spec, None)
    teacher = copy.deepcopy(module).eval()
    objective = Objective(task, teacher, data, spec, wrap=lambda m: m.graph if hasattr(m, "graph") else m)

    def score(m: Any) -> float:
        return float(task.evaluate(ModuleRunner(m, names, outs), test)["accuracy"])

    # post-training: calibrate on 256 training examples (the same count as the int8 rows)
    example = objective.batch(0)
    args = tuple(example[n] for n in names if n in example)
    graph = torch.export.export(copy.deepcopy(module).eval(), args, dynamic_shapes=qp.dynamic_shapes(args)).module()
    graph.graph.eliminate_dead_code()
    graph.recompile()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    prepared = prepare_pt2e(graph, xiq.X86InductorQuantizer().set_global(qp.x86_config(qat=False, per_channel=False, weight_bits=4)))
    with torch.no_grad():
        for i in range(max(1, 256 // spec.batch_size)):
            b = objective.batch(i)
            prepared(*[b[n] for n in names if n in b])
    ptq = score(convert_pt2e(prepared))
    # QAT: the same grid fake-quantized while fine-tuning, then converted
    qgraph = q.prepare_static(copy.deepcopy(module), args, per_channel=False, weight_bits=4)
    student = q.student_class()(qgraph, exported=True)
    q.warm_up_observers(student, [objective.batch(i) for i in range(q.OBSERVER_BATCHES)], names)
    t0 = time.perf_counter()
    result = train(
        student,
        lambda m, step: q.qat_loss(task, m, teacher, objective.batch(step), names, spec),
        spec,
        evaluate=objective.evaluate if objective.can_evaluate else None,
        progress=progress,
        description="QAT at W4A8 per tensor",
    )
    move_exported_model_to_eval(qgraph)
    qat = score(convert_pt2e(qgraph))
    return {
        "float": score(module),
        "ptq": ptq,
        "qat": qat,
        "examples": len(test),
        "training": {
            **{k: getattr(result, k) for k in ("steps", "stopped", "best_step", "first_metric", "best_metric")},
            "seconds": round(time.perf_counter() - t0, 1),
        },
    }


def recovered(row: dict[str, Any]) -> float | None:
    loss = row["float"] - row["ptq"]
    return (row["qat"] - row["ptq"]) / loss if loss >= MIN_LOSS else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(EVAL), action="append", help="zoo model(s); default both")
    ap.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino", "torch"])
    ap.add_argument("--setting", choices=["int8", "w4a8"], action="append", help="default both")
    ap.add_argument("--steps", type=int, default=300, help="QAT fine-tuning steps")
    ap.add_argument("--lr", type=float, default=2e-5, help="QAT learning rate (the qat step's default: 2e-5)")
    ap.add_argument("--max-seconds", type=float, default=None, help="QAT training time bound (int8 setting; default: the step's, 900 s)")
    ap.add_argument("--limit", type=int, default=None, help="score on the first N test examples (default all)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", type=Path, default=None, help="write the rows here too")
    opts = ap.parse_args(argv)
    import modelpress as mp
    from modelpress.progress import rich_bars

    loadavg = Path("/proc/loadavg")
    print(f"load average before: {loadavg.read_text().strip() if loadavg.exists() else 'n/a'}", flush=True)
    rows = []
    for name in opts.model or list(EVAL):
        art = mp.load(name)
        for setting in opts.setting or ["int8", "w4a8"]:
            t0 = time.perf_counter()
            with rich_bars() as bars:
                if setting == "int8":
                    row = int8_rows(art, opts.runtime, opts.steps, opts.lr, opts.limit, opts.threads, bars, opts.max_seconds)
                else:
                    row = w4a8_rows(art, opts.steps, opts.lr, opts.limit, opts.threads, bars)
            where = f"static-int8 on {opts.runtime} (artifacts)" if setting == "int8" else "W4A8 per tensor, PT2E in process"
            rows.append(
                {"model": name, "setting": where, **row, "recovered": recovered(row), "seconds": round(time.perf_counter() - t0, 1)}
            )
            print(json.dumps(rows[-1]), flush=True)
    print("\n| model | setting | float | PTQ | QAT | recovered | examples |\n|---|---|---|---|---|---|---|")
    for r in rows:
        rec = f"{r['recovered']:.0%}" if r["recovered"] is not None else f"n/a (PTQ lost {r['float'] - r['ptq']:+.4f})"
        print(f"| {r['model']} | {r['setting']} | {r['float']:.4f} | {r['ptq']:.4f} | {r['qat']:.4f} | {rec} | {r['examples']:.0f} |")
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=1))
    print(f"\ncommand: {' '.join([Path(sys.executable).name, *sys.argv])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
