"""``modelpress alerts``: Prometheus alert rules for served models (see :mod:`modelpress.rollout.alerts`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelpress.rollout.alerts import DEFAULT_MAX_QUEUE_SIZE, AlertThresholds, _models_of, alert_rules, write_rules


def register_commands(app: typer.Typer) -> None:
    from modelpress.cli.common import handle_errors

    @app.command("alerts")
    @handle_errors
    def alerts_cmd(
        models: Annotated[list[str] | None, typer.Argument(help="Served model names (or use --config).")] = None,
        config: Annotated[
            str | None, typer.Option("--config", "-c", help="The server's YAML/JSON config: names and queue sizes from it.")
        ] = None,
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the rules here (default: stdout).")] = None,
        max_error_rate: Annotated[str, typer.Option("--max-error-rate", help="Error rate that fires, e.g. 1%.")] = "1%",
        max_p99: Annotated[str, typer.Option("--max-p99", help="p99 latency that fires, e.g. 500ms.")] = "500ms",
        max_queue_fill: Annotated[str, typer.Option("--max-queue-fill", help="Queue depth / max_queue_size that fires, e.g. 80%.")] = "80%",
        min_agreement: Annotated[float, typer.Option("--min-agreement", help="Mean shadow agreement below which it fires.")] = 0.99,
        window: Annotated[str, typer.Option("--window", help="Rate window (Prometheus duration).")] = "5m",
        for_: Annotated[str, typer.Option("--for", help="How long a condition holds before it fires.")] = "5m",
    ) -> None:
        """Write Prometheus alert rules (error rate, p99, queue saturation, shadow disagreement) for served models."""
        import sys

        from modelpress.serving.config import ServerConfig, load_config
        from modelpress.units import parse_duration
        from modelpress.units import parse_fraction as parse_rate

        cfg = load_config(config) if config else ServerConfig()
        served: dict[str, int] = _models_of(cfg) if config else {}
        served.update({m: DEFAULT_MAX_QUEUE_SIZE for m in models or [] if m not in served})
        th = AlertThresholds(
            max_error_rate=parse_rate(max_error_rate),
            max_p99_s=parse_duration(max_p99),
            max_queue_fill=parse_rate(max_queue_fill),
            min_agreement=min_agreement,
            rate_window=window,
            for_=for_,
        )
        rules = alert_rules(served, th)
        if output is None:
            import yaml

            sys.stdout.write(yaml.safe_dump(rules, sort_keys=False, width=1000))
            return
        write_rules(rules, output)
        n = sum(len(g["rules"]) for g in rules["groups"])
        typer.echo(f"wrote {n} alert rules for {', '.join(served)} to {output}", err=True)
