"""Build the zoo model ``minilm-sst2`` once and cache it (about 6 minutes: 362 CPU-s measured).

    python scripts/train_sst2.py                     # fine-tune unless cached; print its dev accuracy and folder
    python scripts/train_sst2.py --force             # fine-tune again
    python scripts/train_sst2.py --max-steps 60 --eval-limit 400 --output /tmp/sst2-short   # a short run, elsewhere

all-MiniLM-L6-v2 fine-tuned as a BertForSequenceClassification on a subset of SST-2 train, scored
on sst2-dev. A thin wrapper around :func:`modelpress.zoo.build` (the default recipe, into the
cache) and :func:`modelpress.zoo.sst2.build_sst2` (any budget, into ``--output``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from modelpress.cli.common import console, progress_bars
from modelpress.errors import ConfigError, ModelpressError


def main(argv: list[str] | None = None) -> int:
    from modelpress import zoo
    from modelpress.zoo.sst2 import Sst2TrainConfig, build_sst2

    default = Sst2TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=None, help=f"training phrases (default {default.train_size})")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: one epoch of --train-size)")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {default.lr})")
    parser.add_argument("--eval-limit", type=int, default=None, help="score on the first N dev sentences only (default: all 872)")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, one on a busy machine)")
    parser.add_argument("--output", default=None, help="write here instead of the cache (needed for a non-default recipe)")
    parser.add_argument("--data-dir", default=None, help="data folder (default: $MODELPRESS_DATA, then ../shared/data)")
    parser.add_argument("--force", action="store_true", help="train again even when cached")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    args = parser.parse_args(argv)
    try:
        options = {
            "train_size": args.train_size,
            "max_steps": args.max_steps,
            "lr": args.lr,
            "eval_limit": args.eval_limit,
            "seed": args.seed,
            "threads": args.threads,
        }
        cfg = Sst2TrainConfig(**{k: v for k, v in options.items() if v is not None})
        t0 = time.perf_counter()
        if args.output is None:
            if cfg.model_copy(update={"threads": None}) != default:
                raise ConfigError(
                    "A non-default recipe is not written to the zoo cache.", hint="Add --output DIR, e.g. --output /tmp/sst2-short"
                )
            with progress_bars() as prog:
                art = zoo.build("minilm-sst2", force=args.force, data_dir=args.data_dir, progress=prog, announce=console.print)
        else:
            with progress_bars() as prog:
                art = build_sst2(args.output, config=cfg, data_dir=args.data_dir, progress=prog, overwrite=args.force)
        if args.json:
            print(json.dumps(art.to_json(), indent=2))
        else:
            step = art.manifest.step or {}
            acc = art.manifest.metrics["accuracy"]
            print(
                f"minilm-sst2: accuracy {acc['value']:.4f} on {acc['dataset']} ({art.manifest.metrics['eval_examples']} sentences); "
                f"{step.get('steps')} steps in {step.get('train_seconds')} s ({step.get('threads')} threads); "
                f"this call {time.perf_counter() - t0:.1f} s"
            )
            print(art.path)
    except ModelpressError as exc:
        console.print(f"[bold red]error:[/bold red] {exc.message}")
        if exc.hint:
            console.print(f"[yellow]hint:[/yellow] {exc.hint}")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
