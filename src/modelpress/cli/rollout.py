"""``modelpress rollout ...`` and ``modelpress rollback``: clients of a running server's rollout API.

    modelpress rollout start minilm --candidate 2 --strategy canary --steps 5,25,50,100 --window 60s \\
        --max-error-rate 1% --max-p99-ratio 1.2 --min-agreement 0.99
    modelpress rollout status minilm          # pause | resume | abort | promote | report
    modelpress rollback minilm                # live traffic back to the previous production version

Every command takes ``--url`` (default ``$MODELPRESS_URL``, else http://127.0.0.1:8000) and
``--api-key`` (default ``$MODELPRESS_API_KEY``), and ``--json`` to print the server's answer.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from modelpress.cli.common import console, emit_json, handle_errors, out
from modelpress.rollout.client import DEFAULT_URL, call
from modelpress.units import parse_duration
from modelpress.units import parse_fraction as parse_rate
from modelpress.units import parse_percentages as parse_steps

WIDE = 140  # columns for tables when stdout is not a terminal

UrlOpt = Annotated[str, typer.Option("--url", envvar="MODELPRESS_URL", help="The server's base URL.")]
KeyOpt = Annotated[str | None, typer.Option("--api-key", envvar="MODELPRESS_API_KEY", help="The server's API key (header X-API-Key).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the server's JSON answer.")]
NameArg = Annotated[str, typer.Argument(help="The served model name.")]


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.2f}%"


def _ms(v: Any) -> str:
    return "-" if v is None else f"{float(v):.2f}"


def print_status(doc: dict[str, Any]) -> None:
    spec = doc.get("spec") or {}
    phases = doc.get("phases") or []
    weights = ", ".join(f"{k}: {w:g}%" for k, w in (doc.get("weights") or {}).items())
    out.print(
        f"{doc.get('model')}: {spec.get('strategy', '')} rollout {doc.get('baseline')} -> {doc.get('candidate')} "
        f"is [bold]{doc.get('status')}[/bold]; phase {doc.get('phase')}, step {doc.get('step', 0) + 1}/{len(phases) or 1}; "
        f"traffic {weights or '-'}",
        highlight=False,
        soft_wrap=True,
    )
    if doc.get("status") == "loading":
        out.print(f"  version {doc.get('candidate')} is loading; the first step begins once it is ready", highlight=False)
    if doc.get("driving") is False and doc.get("status") in ("loading", "running", "paused"):
        out.print(f"  driven by the server {doc.get('controller') or '?'}; this one follows the registry", highlight=False)
    if doc.get("recorded") is False:
        out.print("  not recorded in the registry yet: traffic stays on the baseline while the record is retried", highlight=False)
    win = doc.get("window") or {}
    for who in ("candidate", "baseline"):
        w = win.get(who)
        if w:
            out.print(
                f"  window {who}: {w['requests']} requests, errors {_pct(w['error_rate'])}, "
                f"p50 {_ms(w['p50_ms'])} ms, p99 {_ms(w['p99_ms'])} ms"
                + (f", agreement {w['agreement']:.4f}" if w.get("agreement") is not None else ""),
                highlight=False,
                soft_wrap=True,
            )
    for e in (doc.get("events") or [])[-8:]:
        out.print(
            f"  {str(e.get('at', ''))[11:19]} {e.get('action')}: {'; '.join(e.get('reasons') or [])}", highlight=False, soft_wrap=True
        )


def print_report(doc: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{doc['model']}: {doc['candidate']} (candidate) against {doc['baseline']} (baseline)", title_justify="left")
    for col in ("version", "requests", "errors", "error rate (95% CI)", "p50 ms (CI)", "p99 ms (CI)", "outcomes"):
        table.add_column(col, justify="right")

    def ci(v: Any, c: Any, fmt: Any) -> str:
        return f"{fmt(v)} ({fmt(c[0])}-{fmt(c[1])})" if c else fmt(v)

    for label, v in doc["versions"].items():
        outcomes = ", ".join(f"{k} {o['mean']:.4g} (n={o['n']})" for k, o in (v.get("outcomes") or {}).items() if o["mean"] is not None)
        table.add_row(
            label,
            str(v["requests"]),
            str(v["errors"]),
            ci(v["error_rate"], v.get("error_rate_ci"), _pct),
            ci(v["p50_ms"], v.get("p50_ms_ci"), _ms),
            ci(v["p99_ms"], v.get("p99_ms_ci"), _ms),
            outcomes or "-",
        )
    (out if out.is_terminal else Console(width=max(out.width, WIDE))).print(table)  # piped or captured: no wrapping inside cells
    for t in doc["tests"]:
        p = t["p_value"]
        verdict = "significant" if t["significant"] else "not significant"
        if t["difference"] is None:
            line = f"  {t['metric']}: {t['method']} -> not enough data"
        else:
            p_text = f"{p if p is not None else float('nan'):.4g}"
            line = f"  {t['metric']}: {t['method']}, candidate - baseline = {t['difference']:.4g}, p = {p_text} -> {verdict}"
        out.print(line, highlight=False, soft_wrap=True)
    out.print(
        f"[bold]{'The difference is significant' if doc['significant'] else 'No significant difference'}[/bold] "
        f"at alpha = {doc['alpha']:g}.",
        highlight=False,
        soft_wrap=True,
    )


def register_commands(app: typer.Typer) -> None:
    rollout = typer.Typer(
        name="rollout", help="Canary, shadow, blue-green and A/B rollouts on a running server.", no_args_is_help=True, add_completion=False
    )
    app.add_typer(rollout, name="rollout")

    @rollout.command()
    @handle_errors
    def start(
        name: NameArg,
        candidate: Annotated[str, typer.Option("--candidate", help="The candidate's version (the registry version number).")],
        strategy: Annotated[str, typer.Option("--strategy", help="canary, shadow-then-canary, blue-green or ab.")] = "canary",
        steps: Annotated[
            str | None, typer.Option("--steps", help="Candidate percent per step, e.g. 5,25,50,100 (ab: one share, e.g. 50).")
        ] = None,
        window: Annotated[str, typer.Option("--window", help="Analysis window per step, e.g. 60s, 500ms, 5m.")] = "60s",
        max_error_rate: Annotated[str, typer.Option("--max-error-rate", help="Highest candidate error rate, e.g. 1%.")] = "1%",
        max_p99_ratio: Annotated[float | None, typer.Option("--max-p99-ratio", help="Highest candidate p99 / baseline p99.")] = 1.2,
        min_agreement: Annotated[
            float | None, typer.Option("--min-agreement", help="Lowest mean shadow agreement (cosine or label match).")
        ] = 0.99,
        min_requests: Annotated[int, typer.Option("--min-requests", help="Candidate requests a window needs before it counts.")] = 20,
        shadow_fraction: Annotated[
            str, typer.Option("--shadow-fraction", help="Share of requests mirrored in shadow phases, e.g. 100%.")
        ] = "100%",
        shadow_windows: Annotated[int, typer.Option("--shadow-windows", help="Windows of shadow traffic before canary / switch.")] = 1,
        baseline: Annotated[
            str | None, typer.Option("--baseline", help="The baseline version (default: the one serving most traffic).")
        ] = None,
        source: Annotated[
            str | None, typer.Option("--source", help="Where to load the candidate from when not loaded (default NAME:CANDIDATE).")
        ] = None,
        runtime: Annotated[
            str | None,
            typer.Option("--runtime", help="The runtime to load the candidate on (default: the one its manifest records, else torch)."),
        ] = None,
        promote: Annotated[
            bool, typer.Option("--promote/--no-promote", help="Promote the candidate to production in the registry at the end.")
        ] = True,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Start a rollout of CANDIDATE for served model NAME."""
        body: dict[str, Any] = {
            "candidate": candidate,
            "strategy": strategy,
            "window_s": parse_duration(window),
            "max_error_rate": parse_rate(max_error_rate),
            "max_p99_ratio": max_p99_ratio,
            "min_agreement": min_agreement,
            "min_requests": min_requests,
            "shadow_fraction": parse_rate(shadow_fraction),
            "shadow_windows": shadow_windows,
            "promote": promote,
        }
        if steps is not None:
            body["steps"] = parse_steps(steps)
        for key, value in (("baseline", baseline), ("source", source), ("runtime", runtime)):
            if value is not None:
                body[key] = value
        doc = call("POST", url, f"/rollouts/{name}/start", api_key, body)
        emit_json(doc) if as_json else print_status(doc)

    @rollout.command()
    @handle_errors
    def status(name: NameArg, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
        """Phase, step, traffic split, the current window's numbers and the latest decisions."""
        doc = call("GET", url, f"/rollouts/{name}", api_key)
        emit_json(doc) if as_json else print_status(doc)

    def _action(verb: str, doc_line: str) -> None:
        def command(name: NameArg, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
            doc = call("POST", url, f"/rollouts/{name}/{verb}", api_key)
            emit_json(doc) if as_json else print_status(doc)

        command.__doc__ = doc_line
        rollout.command(verb)(handle_errors(command))

    _action("pause", "Pause: keep the traffic split, stop deciding.")
    _action("resume", "Resume a paused rollout (a new window starts).")
    _action("abort", "Abort: all traffic back to the baseline, the candidate unloads.")
    _action("promote", "Promote the candidate now: all traffic to it, production in the registry.")

    @rollout.command()
    @handle_errors
    def report(name: NameArg, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
        """The A/B analysis: counts, error rates, latency with CIs, and whether the difference is significant."""
        doc = call("GET", url, f"/rollouts/{name}/report", api_key)
        emit_json(doc) if as_json else print_report(doc)

    @app.command("rollback")
    @handle_errors
    def rollback(
        name: NameArg,
        why: Annotated[str | None, typer.Option("--why", help="The reason, kept in the registry's stage history.")] = None,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Instant rollback on a running server: live traffic goes back to the previous production version."""
        doc = call("POST", url, f"/rollouts/{name}/rollback", api_key, {"why": why} if why else None)
        if as_json:
            emit_json(doc)
            return
        where = (
            f"; the registry has {doc['production']} in production again"
            if doc.get("registry_changed")
            else " (the rollout was aborted; production is unchanged)"
        )
        console.print(f"[green]{name}[/green] now serves version {doc['serving']}{where}", highlight=False, soft_wrap=True)
