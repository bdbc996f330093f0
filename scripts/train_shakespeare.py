"""Train ``shakespeare-lm`` once and cache it (600 CPU seconds: five minutes of two cores).

    python scripts/train_shakespeare.py            # train unless cached; print where it is
    python scripts/train_shakespeare.py --retrain  # train again
    python scripts/train_shakespeare.py --cpu-budget 120 --max-steps 500   # a shorter run (another cache key)

The model is a character-level Llama trained on the first 90% of tiny-shakespeare; after training
this prints its perplexity on the held-out last 10% (dataset ``tinyshakespeare-test``), measured on
the saved files and stored in the model's manifest.
"""

from __future__ import annotations

import argparse
import json
import sys

from modelpress.artifacts import Artifact
from modelpress.cli.common import console, progress_bars
from modelpress.errors import ModelpressError
from modelpress.zoo.shakespeare import ShakespeareConfig, cached_path, ensure_trained, is_cached, training_report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-budget", type=float, default=ShakespeareConfig.cpu_budget_s, help="CPU seconds for the training loop")
    parser.add_argument("--max-steps", type=int, default=ShakespeareConfig.max_steps)
    parser.add_argument("--threads", type=int, default=ShakespeareConfig.threads)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--retrain", action="store_true", help="train again even when cached")
    args = parser.parse_args()
    try:
        cfg = ShakespeareConfig(cpu_budget_s=args.cpu_budget, max_steps=args.max_steps, threads=args.threads)
        if is_cached(cfg) and not args.retrain:
            console.print(f"cached: {cached_path(cfg)} (pass --retrain to train again)")
        with progress_bars() as prog:
            path = ensure_trained(data_dir=args.data_dir, config=cfg, progress=prog, retrain=args.retrain)
        art = Artifact.open(path)
        report = training_report(path)
        print(
            json.dumps(
                {
                    k: report[k]
                    for k in (
                        "parameters",
                        "steps",
                        "tokens_seen",
                        "stopped_by",
                        "seconds",
                        "cpu_seconds",
                        "train_loss_ema",
                        "heldout_loss",
                    )
                },
                indent=2,
            )
        )
        ppl = art.manifest.metrics.get("perplexity", {})
        if ppl:
            print(f"perplexity on {ppl['dataset']}: {ppl['value']:.4f} ({ppl['tokens']:.0f} characters)")
        print(path)
    except ModelpressError as exc:
        console.print(f"[bold red]error:[/bold red] {exc.message}")
        if exc.hint:
            console.print(f"[yellow]hint:[/yellow] {exc.hint}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
