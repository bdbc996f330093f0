"""Build the zoo model ``mnist-cnn`` once and cache it (about 20 s on one core).

    python scripts/train_mnist.py                    # train unless cached; print its test accuracy and folder
    python scripts/train_mnist.py --force            # train again
    python scripts/train_mnist.py --epochs 2 --output /tmp/mnist-short   # another recipe: written elsewhere

A thin wrapper around :func:`modelpress.zoo.build` (the default recipe, into the cache) and
:func:`modelpress.zoo.mnist.build_mnist` (any recipe, into ``--output``).
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
    from modelpress.zoo.mnist import MnistTrainConfig, build_mnist

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help=f"default {MnistTrainConfig().epochs}")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, one on a busy machine)")
    parser.add_argument("--output", default=None, help="write here instead of the cache (needed for a non-default recipe)")
    parser.add_argument("--data-dir", default=None, help="data folder (default: $MODELPRESS_DATA, then ../shared/data)")
    parser.add_argument("--force", action="store_true", help="train again even when cached")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    args = parser.parse_args(argv)
    try:
        changes = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed), ("threads", args.threads)) if v is not None}
        cfg = MnistTrainConfig(**changes)
        t0 = time.perf_counter()
        if args.output is None:
            if cfg.model_copy(update={"threads": None}) != MnistTrainConfig():
                raise ConfigError(
                    "A non-default recipe is not written to the zoo cache.", hint="Add --output DIR, e.g. --output /tmp/mnist-short"
                )
            with progress_bars() as prog:
                art = zoo.build("mnist-cnn", force=args.force, data_dir=args.data_dir, progress=prog, announce=console.print)
        else:
            with progress_bars() as prog:
                art = build_mnist(args.output, config=cfg, data_dir=args.data_dir, progress=prog, overwrite=args.force)
        if args.json:
            print(json.dumps(art.to_json(), indent=2))
        else:
            step = art.manifest.step or {}
            print(
                f"mnist-cnn: accuracy {art.manifest.metrics['accuracy']['value']:.4f} on mnist-test; trained in "
                f"{step.get('train_seconds')} s ({step.get('threads')} threads); this call {time.perf_counter() - t0:.1f} s"
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
