"""The accuracy-aware tuner: the fastest variant of a model, on this machine, that keeps its quality.

``tune(model, max_drop=0.01, budget_s=300)`` searches candidates (technique x parameters x
runtime: the hardware preset's configs, the peers' default recipes, and the unoptimized runtimes)
in stages, spending the budget where the answer is (docs/tune.md):

1. build every candidate and 2. time it side by side with the baseline (PyTorch fp32 eager), in
   interleaved rounds: cheap next to scoring a full dataset, and done for every candidate
   whatever the budget;
3. in order of speed-up, fastest first: drop a candidate slower than the best one already
   passing the gate (timed side by side with it first, when that one is not the baseline);
   screen the rest on a small fixed subsample of the dataset, dropping clear failures (below
   the gate by a margin that covers the subsample's noise);
4. score the survivors on the full dataset and gate them, until one passes (near ties of it are
   scored too), while the budget lasts;
5. re-time the Pareto front and the passing candidates together, in one process and
   interleaved rounds, and pick the fastest passing one from those figures.

Every candidate's point says how far it got (``stage``) and why it stopped (``stop``).

Compound candidates (:mod:`.compound`: a distilled student or a pruned model, then quantized; QAT)
train for minutes: they are built after every cheap candidate is built and timed, only under a
budget long enough for their training (else they stop with ``needs a longer budget``), and then
timed, screened and scored like the rest. A fast quantized candidate that fails only on agreement
is tried again with its most sensitive layers kept in float (:mod:`.mixed`): each such version is a
candidate of its own, placed in the speed order and scored like the rest.

Nothing is done twice: each candidate's result, stage by stage, is cached under
``MODELPRESS_HOME/cache/tune`` by (artifact hash, config, runtime, machine, dataset, gate,
measurement settings), so a tune that is interrupted resumes where it stopped, and a second tune
with a larger budget only measures what is new (the final re-timing is always done again).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelpress._fs import crash_point
from modelpress.artifacts import Artifact
from modelpress.errors import GateFailedError, ModelpressError
from modelpress.optimize.gate import GateConfig, check, flat_metrics, recovery
from modelpress.optimize.search import compound, mixed
from modelpress.optimize.search.candidates import (  # noqa: F401  (named here too: the tuner's API)
    BASELINE_RUNTIME,
    Candidate,
    default_candidates,
    parse_candidates,
    peer_candidates,
)
from modelpress.optimize.search.front import (  # noqa: F401  (FIDELITY, fidelity and the stops named here too)
    FIDELITY,
    STAGES,
    STOP_BUDGET,
    STOP_ERROR,
    STOP_GATE,
    STOP_NEEDS_BUDGET,
    STOP_SCREEN,
    STOP_SLOWER,
    Point,
    TuneResult,
    fidelity,
    pareto_front,
)
from modelpress.optimize.search.outputs import register_passing, search_summary, write_outputs
from modelpress.optimize.search.stages import _set_speed, _x, check_settings, retime_points, score_baseline
from modelpress.optimize.search.tune_cache import CACHE_VERSION, _cached_point, _machine_key, _resume, _save
from modelpress.progress import ProgressFactory, no_progress

SPEED_ROUNDS = 3  # interleaved rounds of each candidate and the baseline
# A candidate is not scored when its speed-up is more than this fraction below the best passing
# one's: its own timing and the best one's were taken at different moments, and on a loaded
# machine such ratios move by several percent (the final re-timing settles near ties).
SPEED_TIE = 0.10
# Before candidates are dropped as slower than a passing one (other than the baseline), it is timed
# side by side with this many of the next candidates: enough to catch a lucky first timing of the
# best, few enough that the runners loaded together stay cheap.
CONFIRM_RIVALS = 3


def _first_timing(pipe: Any, art: Artifact, runtime: str) -> dict[str, Any] | None:
    """A candidate's own timing (stage 2), side by side with the baseline (a causal LM: decode tokens/s, :mod:`.llm_speed`)."""
    if pipe.original.task == "causal-lm":
        from modelpress.optimize.search.llm_speed import time_decode

        return time_decode(pipe.original, [(art, runtime)], rounds=SPEED_ROUNDS, threads=pipe.threads)[0]
    return pipe.measure(art, runtime)


def tune(
    model: Any,
    *,
    task: str | None = None,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    max_drop: float = 0.01,
    min_agreement: float | None = None,
    agreement_metric: str | None = None,
    gate: GateConfig | None = None,
    budget_s: float = 300.0,
    candidates: list[Any] | None = None,
    preset: str | None = None,
    runtimes: list[str] | None = None,
    limit: int | None = None,
    threads: int | None = None,
    batch_size: int = 32,
    seq_len: int = 128,
    bench_seconds: float = 1.0,
    screen_rows: int | None = None,
    exhaustive: bool = False,
    compound_candidates: bool | None = None,
    compound_train_s: float | None = None,
    auto_exclude: int = mixed.MAX_LAYERS,
    output: str | os.PathLike | None = None,
    register: bool = False,
    registry: Any = None,
    name: str | None = None,
    use_cache: bool = True,
    report: bool = True,
    progress: ProgressFactory = no_progress,
    on_point: Callable[[Point], None] | None = None,
) -> TuneResult:
    """Search for the fastest variant of ``model`` that keeps quality; see the module docstring.

    ``max_drop``: the primary metric may lose at most this fraction (0.01 = 1%).
    ``min_agreement``: also require this agreement with the original, on ``agreement_metric`` (one of the task's
    ``agreement_metrics``, e.g. ``top10_agreement``; default the task's: mean cosine / labels / top-1 tokens).
    ``auto_exclude``: the most layers a mixed-precision candidate keeps in float (:mod:`.mixed`; 0: none).
    ``budget_s``: wall-clock seconds for the search's scoring stages; every candidate is built and
    timed whatever the budget (the table says when that alone took longer).
    ``screen_rows``: rows of the fixed screening subsample (None: a tenth of the split, at least
    200; 0: no screening). ``exhaustive``: fully score every candidate (no screening, none dropped
    for being slower), fastest first, while the budget lasts: the reference the search is checked against.
    Raises :class:`GateFailedError` when no candidate passes the gate and ``output`` is None.
    """
    from modelpress.api import as_artifact
    from modelpress.bench.measure import BenchConfig, machine_info
    from modelpress.locations import cache_dir, find_data_dir
    from modelpress.optimize.evaluation import Evaluator
    from modelpress.optimize.search.llm_speed import DECODE_TOKENS, PROMPT_TOKENS, retime_decode
    from modelpress.optimize.search.stages import retime, screen_margin, screen_size, screening_gate, subsample
    from modelpress.optimize.step import Pipeline, Speed, record

    check_settings(max_drop, budget_s, screen_rows, compound_train_s, auto_exclude)
    t_start = time.perf_counter()
    original = as_artifact(model, task)
    gate = gate or GateConfig.for_task(original.task, max_drop=max_drop, min_agreement=min_agreement, agreement_metric=agreement_metric)
    cands = parse_candidates(candidates) if candidates else default_candidates(original.task, preset, runtimes)
    if not any(c.config is None and c.runtime == BASELINE_RUNTIME for c in cands):
        cands.insert(0, Candidate(BASELINE_RUNTIME))
    ddir = find_data_dir(data_dir)
    machine = machine_info()
    reg = None
    if register:
        from modelpress.optimize.registering import open_registry

        reg = registry or open_registry()
    # Every candidate goes through the one step pipeline, timed side by side with the baseline
    # (the original on PyTorch eager) in interleaved rounds: its speed-up is measured, not derived.
    bcfg = BenchConfig(batch_sizes=[batch_size], seq_lens=[seq_len], seconds=bench_seconds, latency_calls=50, rounds=SPEED_ROUNDS)
    pipe = Pipeline(
        original,
        gate,
        data=data,
        data_dir=ddir,
        limit=limit,
        threads=threads,
        speed=Speed(bcfg, baseline_runtime=BASELINE_RUNTIME),
        registry=reg,
        name=name,
        progress=progress,
    )
    evaluator = pipe.evaluator
    text = evaluator.task.uses_tokenizer()
    if original.task == "causal-lm":
        retime = retime_decode  # decode tokens/s on each candidate's generation engine
    n_screen = 0 if exhaustive else screen_size(len(evaluator.dataset), screen_rows)
    margin = screen_margin(n_screen) if n_screen else 0.0
    settings = {
        "max_drop": max_drop,
        "min_agreement": min_agreement,
        "agreement_metric": agreement_metric or (evaluator.task.agreement_metric if min_agreement is not None else None),
        "auto_exclude": auto_exclude,
        "budget_s": budget_s,
        "batch_size": batch_size,
        "seq_len": seq_len if text else None,
        "bench_seconds": bench_seconds,
        "limit": limit,
        "threads": threads,
        "dataset": evaluator.dataset_name,
        "exhaustive": exhaustive,
        "screen_rows": n_screen,
        "compound_train_s": compound_train_s or compound.TRAIN_S,
    }
    root = cache_dir("tune")
    src_hash = original.content_hash()
    seconds: dict[str, float] = {}
    notes: list[str] = []

    base = pipe.baseline()  # the original's evaluation (and its registration)
    base_flat = flat_metrics(base)
    primary = evaluator.task.primary_metric
    reg_ref = pipe.original_ref
    seconds["original"] = time.perf_counter() - t_start

    def elapsed() -> float:
        return time.perf_counter() - t_start

    reported: set[int] = set()

    def report_point(p: Point) -> None:
        if on_point is not None and id(p) not in reported:
            reported.add(id(p))
            on_point(p)

    # -- stages 1 and 2: build and time every candidate (cheap next to scoring the full split) ----------
    points: list[Point] = []
    entries: dict[int, Path] = {}
    baseline: Point | None = None
    bar = progress(f"building and timing {len(cands)} candidates of {original.name}", len(cands))

    def build_and_time(cand: Candidate) -> tuple[Point, Path]:
        """Stages 1 and 2 for one candidate (from the cache when it is there); a compound one only when the budget allows."""
        key_data = {
            "v": CACHE_VERSION,
            "source": src_hash,
            **cand.key_data(),
            "machine": _machine_key(machine),
            "dataset": evaluator.dataset_name,
            "limit": limit,
            # a causal LM is timed by decode tokens/s (llm_speed), whatever the batch settings
            "bench": ["decode", DECODE_TOKENS, PROMPT_TOKENS] if original.task == "causal-lm" else [batch_size, seq_len, bench_seconds],
            "threads": threads,
            "gate": gate.model_dump(mode="json"),
        }
        key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:24]
        entry = root / key
        data_ = _cached_point(entry) if use_cache else None
        if data_ is not None:
            return _resume(data_, cand, n_screen, margin), entry
        step = cand.config.to_step() if cand.config else None
        point = Point(cand.label, cand.runtime, step, cand.peer, "skipped", float_layers=getattr(cand, "layers", None))
        if isinstance(cand, compound.Compound):
            point.steps = cand.steps()
            skip = compound.why_not(cand, budget_s, budget_s - elapsed())
            if skip is not None:  # not built: nothing to cache
                point.stop, point.reason = skip
                return point, entry
        t0 = time.perf_counter()
        try:
            art = original
            if cand.config is not None:
                art_dir = entry / "artifact"
                if art_dir.exists():
                    shutil.rmtree(art_dir)  # left by an interrupted run
                if isinstance(cand, compound.Compound):
                    art, first = compound.build(pipe, original, cand, art_dir, root)
                    point.intermediate, point.training = str(first.path), compound.training_summary(first)
                else:
                    art = pipe.apply(original, cand.config, art_dir, overwrite=True)
                crash_point("tune-artifact")
                point.artifact = str(art.path)
            point.stage = "built"
            speed = _first_timing(pipe, art, cand.runtime)
            if art is not original:
                record(art, None, None, speed)
            _set_speed(point, speed)
            point.first_speedup, point.first_throughput = point.speedup, point.throughput
            point.stage, point.status = "timed", "timed"
        except ModelpressError as exc:
            point.status, point.stop, point.error = "failed", STOP_ERROR, exc.message
            point.reason = f"while {'timing' if point.stage == 'built' else 'building'} it: {exc.message}"
        point.seconds = time.perf_counter() - t0
        _save(entry, point)
        return point, entry

    def add(point: Point, entry: Path) -> None:
        if point.status == "failed" or point.stop == STOP_NEEDS_BUDGET:
            report_point(point)
        points.append(point)
        entries[id(point)] = entry

    compounds = [c for c in cands if isinstance(c, compound.Compound)]  # built last: they train
    cands = [c for c in cands if not isinstance(c, compound.Compound)]
    for cand in cands:
        point, entry = build_and_time(cand)
        if cand.config is None and cand.runtime == BASELINE_RUNTIME:
            baseline = point
            if point.status != "failed" and point.stage != "scored":
                score_baseline(evaluator, base, gate, point)  # the reference itself: the original's evaluation
                _save(entry, point)
        add(point, entry)
        bar(1)
    seconds["build_and_time"] = elapsed() - seconds["original"]
    if elapsed() > budget_s:
        notes.append(
            f"Building and timing all {len(cands)} candidates took {elapsed():.0f} s (with the original's evaluation), more than "
            f"the budget of {budget_s:.3g} s: every candidate is still built and timed, but no time was left to score them "
            "(those not scored say 'budget spent'); give a longer --budget."
        )

    # -- compound candidates: trained, so built after every cheap one is timed, and only when the budget allows ----
    if compound_candidates if compound_candidates is not None else not candidates:
        compounds += compound.default_compounds(original, points, compound_train_s or compound.TRAIN_S, ddir)
    if compounds:
        bar = progress(f"building and timing {len(compounds)} compound candidates (trained first)", len(compounds))
        for cand in compounds:
            add(*build_and_time(cand))
            bar(1)
        seconds["compound_build_and_time"] = elapsed() - seconds["original"] - seconds["build_and_time"]
        notes.extend(compound.budget_notes(compounds, points, budget_s))

    # -- stages 3 and 4: screen on the subsample, then score in full, fastest first ---------------------
    screen_eval = None
    if n_screen:
        screen_eval = Evaluator(original, data=data, data_dir=ddir, limit=limit, threads=threads)
        screen_eval.dataset = subsample(evaluator.dataset, n_screen)
        screen_eval.reference = evaluator.reference  # the original's outputs are remembered per batch: shared
    best = baseline if baseline is not None and baseline.passed else None
    order = sorted(
        (p for p in points if p is not baseline and p.status != "failed" and p.first_speedup is not None),
        key=lambda p: -(p.first_speedup or 0.0),
    )
    t_scoring = time.perf_counter()
    bar = progress(f"scoring the fastest candidates ({'every one' if exhaustive else 'until one passes'})", len(order))
    # When a candidate other than the baseline passes, the next ones are compared with it by figures
    # taken at different moments; before dropping any as slower, the best and the next few are timed
    # together (one interleaved run), so a lucky first timing of the best does not drop them all.
    confirmed: dict[int, float] = {}  # id(point) -> its speed-up in the confirmation run of ``confirmed_for``
    confirmed_for: Point | None = None

    def speed_of(p: Point, other: Point) -> tuple[float, float, bool]:
        """``p``'s and ``other``'s speed-ups, from the same confirmation run when both have one."""
        if confirmed_for is not None and id(p) in confirmed and id(other) in confirmed:
            return confirmed[id(p)], confirmed[id(other)], True
        bar_ = other.first_speedup or 0.0
        if id(other) in confirmed:  # the best's fresh figure may be lower than its first one: the fairer bar
            bar_ = min(bar_, confirmed[id(other)])
        return p.first_speedup or 0.0, bar_, False

    def confirm(best_: Point, i: int) -> None:
        nonlocal confirmed, confirmed_for
        confirmed_for, confirmed = best_, {}
        rivals = [q for q in order[i:] if q.stop is None and q.stage != "scored"][:CONFIRM_RIVALS]
        group = [best_, *rivals]
        advance = progress(f"timing {best_.label} side by side with the next {len(rivals)} candidates", None)
        try:
            recs = retime(
                original,
                [(Artifact.open(q.artifact) if q.artifact else original, q.runtime) for q in group],
                config=bcfg,
                threads=threads,
                data_dir=ddir,
            )
        except ModelpressError as exc:
            notes.append(f"Timing {best_.label} side by side with its rivals failed ({exc.message}); their own timings were compared.")
            return
        finally:
            advance(1)
        confirmed = {id(q): float(r.get("throughput_ratio") or 0.0) for q, r in zip(group, recs, strict=True)}
        confirmations.append({"best": best_.label, **{q.label: confirmed[id(q)] for q in group}})

    confirmations: list[dict[str, Any]] = []

    def expand(p: Point, i: int) -> None:
        """A fast int8 candidate failing only on agreement: its mixed-precision versions (:mod:`.mixed`), timed, in the order."""
        if spent():  # they could only stop for the budget
            return
        faster_than = speed_of(p, best)[1] if best is not None else None
        for cand in mixed.candidates_for(p, pipe, root, max_layers=auto_exclude, faster_than=faster_than, notes=notes):
            q, entry = build_and_time(cand)
            add(q, entry)
            if q.status != "failed" and q.first_speedup is not None:
                after = [j for j in range(i + 1, len(order)) if (order[j].first_speedup or 0.0) < q.first_speedup]
                order.insert(after[0] if after else len(order), q)

    def spent() -> bool:  # the budget stops scoring once a non-baseline candidate passes (docs/tune.md, stage 4)
        return elapsed() > budget_s and best is not None and best is not baseline

    for i, p in enumerate(order):
        bar(1)
        if p.stage == "scored" or p.stop in (STOP_SCREEN, STOP_GATE, STOP_ERROR):  # known from the cache
            if p.passed and (best is None or speed_of(p, best)[0] > speed_of(p, best)[1]):
                best = p
            report_point(p)
            expand(p, i)
            continue
        if not exhaustive and best is not None:
            mine, theirs, together = speed_of(p, best)
            if mine < theirs * (1.0 - SPEED_TIE) and best is not baseline and confirmed_for is not best:
                confirm(best, i)  # about to drop it: first time it side by side with the best
                mine, theirs, together = speed_of(p, best)
            if mine < theirs * (1.0 - SPEED_TIE):
                p.stop = STOP_SLOWER
                how = "timed side by side with it" if together else "each timed on its own against the baseline"
                p.reason = f"{_x(mine)} against {_x(theirs)} for {best.label}, which passes the gate ({how})"
                report_point(p)
                continue
        if spent():
            p.stop = STOP_BUDGET
            what = "screened" if n_screen and p.stage == "timed" else "scored"
            p.reason = f"the budget of {budget_s:.3g} s was spent before it was {what}"
            report_point(p)
            continue
        t0 = time.perf_counter()
        art = Artifact.open(p.artifact) if p.artifact else original
        try:
            if screen_eval is not None and p.stage == "timed":
                s_eval = screen_eval.evaluate(art, p.runtime)
                s_base = flat_metrics(screen_eval.original_result())
                verdict = check(s_base, flat_metrics(s_eval), screening_gate(gate, s_base, margin))
                p.screen = {
                    "rows": n_screen,
                    "margin": margin,
                    "passed": verdict.passed,
                    "quality": flat_metrics(s_eval),
                    "gate": verdict.to_json(),
                }
                p.stage = "screened"
                if not verdict.passed:
                    p.stop = STOP_SCREEN
                    p.reason = f"on {n_screen} rows, with a margin of {margin:.3f} below the gate: {verdict.summary()}"
                elif spent():
                    p.stop, p.reason = STOP_BUDGET, f"passed screening; the budget of {budget_s:.3g} s was spent before it was scored"
            if p.stop is None:
                evaluation, verdict = pipe.judge(art, p.runtime)
                flat = flat_metrics(evaluation)
                p.quality = flat
                p.recovery = recovery(primary, base_flat[primary], flat[primary]) if primary in flat and primary in base_flat else None
                p.gate, p.passed, p.stage, p.status = verdict.to_json(), verdict.passed, "scored", "measured"
                if art is not original:
                    record(art, evaluation, verdict, art.manifest.metrics.get("speed"))
                if not verdict.passed:
                    p.stop, p.reason = STOP_GATE, verdict.summary()
                elif best is None or speed_of(p, best)[0] > speed_of(p, best)[1]:
                    best = p
        except ModelpressError as exc:
            p.status, p.stop, p.error = "failed", STOP_ERROR, exc.message
            p.reason = f"while scoring it: {exc.message}"
        p.seconds += time.perf_counter() - t0
        _save(entries[id(p)], p)
        report_point(p)
        expand(p, i)
    seconds["scoring"] = time.perf_counter() - t_scoring

    # -- stage 5: re-time the front and the passing candidates together, then pick ---------------------
    for p in pareto_front(points, original.task):
        p.on_front = True
    passing = [p for p in points if p.status == "measured" and p.passed]
    again = [p for p in points if p.status == "measured" and (p.passed or p.on_front) and p is not baseline]
    t_retime = time.perf_counter()
    if again:
        failed = retime_points(retime, original, again, baseline, points, config=bcfg, threads=threads, data_dir=ddir, progress=progress)
        if failed:
            notes.append(f"The final re-timing failed ({failed}); the pick rests on each candidate's own timing.")
    seconds["retime"] = time.perf_counter() - t_retime
    # The speed-up (against the baseline timed in the same rounds) ranks candidates timed at different
    # moments fairly; after the re-timing, every passing candidate's comes from the same rounds.
    chosen = max(passing, key=lambda p: p.speedup or 0.0) if passing else None
    for p in points:
        report_point(p)
    # confirmations: the best passing candidate timed side by side with its next rivals
    search = search_summary(
        points, exhaustive=exhaustive, screen_rows=n_screen, margin=margin, seconds=seconds, confirmations=confirmations
    )
    search["speed_tie"] = SPEED_TIE

    result = TuneResult(
        original.name,
        original.task,
        evaluator.dataset_name,
        primary,
        base,
        points,
        chosen,
        gate.model_dump(mode="json"),
        machine,
        settings,
        registered_original=reg_ref,
        notes=notes,
        search=search,
    )
    if reg is not None:
        register_passing(pipe, passing, reg_ref, evaluator.dataset_name)
    if output is not None:
        write_outputs(result, output, report=report)
    if chosen is None and output is None:
        raise GateFailedError(
            f"No candidate kept the quality gate ({len([p for p in points if p.status == 'measured'])} scored in full).",
            hint="Allow a larger drop (--max-drop 2%), a longer --budget, or add candidates.",
        )
    return result
