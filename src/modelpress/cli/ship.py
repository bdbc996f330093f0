"""``modelpress ship`` (see :mod:`modelpress.ship`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from modelpress.rollout.client import DEFAULT_URL
from modelpress.ship import EXIT_ROLLED_BACK, describe_event, ship
from modelpress.units import parse_duration, parse_fraction, parse_percentages


def register_commands(app: typer.Typer) -> None:
    from modelpress.cli.common import console, emit_json, handle_errors, out

    @app.command("ship")
    @handle_errors
    def ship_cmd(
        name: Annotated[
            str, typer.Argument(help="The served (and registry) model name; or a model folder: its name is the folder's, --from it.")
        ],
        source: Annotated[
            str | None, typer.Option("--from", help="The model to optimize: a folder, short name (minilm) or registry ref (default: NAME).")
        ] = None,
        recipe: Annotated[Path | None, typer.Option("--recipe", help="A recipe file (YAML/JSON); every step must pass the gate.")] = None,
        tune_: Annotated[bool, typer.Option("--tune", help="Let the tuner pick the fastest variant that passes the gate.")] = False,
        max_drop: Annotated[str, typer.Option("--max-drop", help="The primary metric may drop at most this much.")] = "1%",
        budget: Annotated[str, typer.Option("--budget", help="The tuner's time: 90s, 5m.")] = "5m",
        steps: Annotated[str, typer.Option("--steps", help="Canary percentages after the shadow window.")] = "5,25,50,100",
        window: Annotated[str, typer.Option("--window", help="Analysis window per step: 60s, 500ms.")] = "60s",
        max_error_rate: Annotated[str, typer.Option("--max-error-rate", help="Highest candidate error rate.")] = "1%",
        max_p99_ratio: Annotated[float, typer.Option("--max-p99-ratio", help="Highest candidate p99 / baseline p99.")] = 1.2,
        min_agreement: Annotated[float, typer.Option("--min-agreement", help="Lowest mean shadow agreement.")] = 0.99,
        min_requests: Annotated[int, typer.Option("--min-requests", help="Candidate requests a window needs.")] = 20,
        data: Annotated[str | None, typer.Option("--data", "-d", help="Dataset for the gate (default: the task's).")] = None,
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for the variants (default out/ship/NAME).")] = None,
        registry: Annotated[str | None, typer.Option("--registry", help="Registry URL or SQLite file (the server's).")] = None,
        url: Annotated[str, typer.Option("--url", envvar="MODELPRESS_URL", help="The server's base URL.")] = DEFAULT_URL,
        api_key: Annotated[str | None, typer.Option("--api-key", envvar="MODELPRESS_API_KEY", help="The server's API key.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """Optimize with the gate, register, shadow, canary to production; exit 0 only on promotion.

        A causal LM (e.g. modelpress ship ../shared/data/models/stories260k --recipe recipes/llm-ship-gptq-int4.yaml
        --data tinystories --min-agreement 0.6) is shadowed with greedy first-token agreement and held to its
        time to first token (docs/rollouts.md, "LLMs").
        """
        from modelpress.cli.optimize import parse_duration as parse_budget
        from modelpress.cli.optimize import parse_fraction as parse_max_drop
        from modelpress.ship import name_and_source

        name, source = name_and_source(name, source)

        def show(e: dict[str, Any]) -> None:
            if not as_json:
                out.print(describe_event(e), highlight=False, soft_wrap=True)

        res = ship(
            name,
            source,
            recipe=recipe,
            tune=tune_,
            max_drop=parse_max_drop(max_drop),
            budget_s=parse_budget(budget),
            steps=parse_percentages(steps),
            window_s=parse_duration(window),
            url=url,
            api_key=api_key,
            registry=registry,
            output=output,
            data=data,
            on_event=show,
            rollout={
                "max_error_rate": parse_fraction(max_error_rate),
                "max_p99_ratio": max_p99_ratio,
                "min_agreement": min_agreement,
                "min_requests": min_requests,
            },
        )
        if as_json:
            emit_json(res.to_json())
        elif res.status == "unchanged":
            out.print(f"{name}: the optimized variant is {res.candidate_ref}, already in production; nothing to roll out.", highlight=False)
        elif res.ok:
            out.print(
                f"[green]{name}: {res.candidate_ref} ({res.candidate_runtime}) is in production[/green] (was {res.baseline_ref}).",
                highlight=False,
            )
        else:
            console.print(
                f"[red]{name}: the rollout of {res.candidate_ref} ended {res.status}[/red]: "
                f"{res.rollout.get('reason', '')}; {res.baseline_ref} still serves.",
                highlight=False,
                soft_wrap=True,
            )
        if not res.ok:
            raise typer.Exit(EXIT_ROLLED_BACK)
