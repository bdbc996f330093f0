"""The rollout management API (every endpoint needs the server's API key when it has one).

| method and path | does |
|---|---|
| ``GET /rollouts`` | every rollout on this server |
| ``POST /rollouts/{model}/start`` | start one; body: a :class:`~modelpress.rollout.spec.RolloutSpec` as JSON |
| ``GET /rollouts/{model}`` | status: phase, step, weights, the current window's numbers, recent decisions |
| ``POST /rollouts/{model}/pause``, ``/resume``, ``/abort``, ``/promote`` | act by hand |
| ``POST /rollouts/{model}/rollback`` | instant rollback of live traffic (``{"why": "..."}`` optional) |
| ``GET /rollouts/{model}/report`` | the A/B analysis with significance tests |
| ``GET /rollouts/{model}/events`` | every recorded decision (from the registry) |
| ``POST /feedback`` | ``{"request_id": "...", "value": 1.0, "metric": "clicked", "model": "minilm"}`` (or ``{"outcomes": [...]}``) |

Feedback: at most 1,000 outcomes per request; ``model`` is optional (when given, the request
must have been answered by it); an id that answered more than one request takes none (409).

Errors are ``{"error": "..."}`` with 400 (bad spec), 401 (key), 404 (no such model, rollout or
request id) and 409 (the rollout's state does not allow it).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, RootModel
from starlette.responses import Response

from modelpress.errors import InvalidInputError
from modelpress.rollout.spec import RolloutSpec
from modelpress.serving.http import json_response, loads, openapi_body

router = APIRouter(tags=["Rollouts"])
SPEC_EXAMPLE = (
    '{"candidate": "2", "strategy": "canary", "steps": [5, 25, 50, 100], "window_s": 60, "max_error_rate": 0.01, "max_p99_ratio": 1.2}'
)
FEEDBACK_EXAMPLE = '{"request_id": "9f2c41d0a1b2c3d4", "value": 1.0, "metric": "clicked"}'
MAX_OUTCOMES_PER_REQUEST = 1000  # outcomes in one POST /feedback
MAX_REQUEST_ID_CHARS = 128
MAX_WHY_CHARS = 1000  # a hand-made decision's reason, recorded in the registry's events


# The bodies as the schema shows them (``/openapi.json``). The handlers read the raw body themselves so
# that every error names an example; the checks below are the same bounds these models declare.
class WhyBody(BaseModel):
    """The optional reason of a hand-made decision (abort, rollback)."""

    model_config = ConfigDict(extra="forbid")
    why: str | None = Field(None, max_length=MAX_WHY_CHARS, examples=["p99 doubled"])


class Outcome(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=MAX_REQUEST_ID_CHARS, examples=["9f2c41d0a1b2c3d4"])
    value: float
    metric: str = Field("outcome", examples=["clicked"])
    model: str | None = None


class Outcomes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    outcomes: list[Outcome] = Field(min_length=1, max_length=MAX_OUTCOMES_PER_REQUEST)


class FeedbackBody(RootModel[Outcome | Outcomes]):
    """One outcome, or ``{"outcomes": [...]}``."""


def _extension(request: Request) -> Any:
    """The server's :class:`~modelpress.rollout.extension.RolloutExtension`, once the API key checks out."""
    request.app.state.server.check_management_key(request)
    return request.app.state.rollouts


async def _body(request: Request, example: str, *, required: bool = True) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip() and not required:
        return {}
    doc = loads(raw, example=example)
    if not isinstance(doc, dict):
        raise InvalidInputError("The request body must be a JSON object.", hint=f"Example: {example}")
    return doc


async def _why(request: Request, example: str) -> str | None:
    """The optional ``{"why": "..."}`` of a hand-made decision (abort, rollback); None when not given."""
    why = (await _body(request, f'{{"why": "{example}"}}', required=False)).get("why")
    if why is not None and (not isinstance(why, str) or len(why) > MAX_WHY_CHARS):
        raise InvalidInputError(f"'why' must be a string of at most {MAX_WHY_CHARS} characters.", hint=f'Example: {{"why": "{example}"}}')
    return why or None


@router.get("/rollouts", summary="Every rollout on this server (API key)")
async def list_rollouts(request: Request) -> Response:
    return json_response(_extension(request).rollouts.describe_all())


@router.post("/rollouts/{model}/start", summary="Start a rollout (API key)", openapi_extra=openapi_body(RolloutSpec))
async def start(request: Request, model: str) -> Response:
    ext = _extension(request)
    spec = await _body(request, SPEC_EXAMPLE)
    return json_response(await ext.rollouts.start(model, spec), 201)


@router.get("/rollouts/{model}", summary="A rollout's status (API key)")
async def status(request: Request, model: str) -> Response:
    return json_response(_extension(request).rollouts.status(model))


@router.post("/rollouts/{model}/pause", summary="Pause: keep the split, stop deciding (API key)")
async def pause(request: Request, model: str) -> Response:
    return json_response(await _extension(request).rollouts.pause(model))


@router.post("/rollouts/{model}/resume", summary="Resume a paused rollout (API key)")
async def resume(request: Request, model: str) -> Response:
    return json_response(await _extension(request).rollouts.resume(model))


@router.post(
    "/rollouts/{model}/abort",
    summary="Abort: all traffic back to the baseline (API key)",
    openapi_extra=openapi_body(WhyBody, required=False),
)
async def abort(request: Request, model: str) -> Response:
    ext = _extension(request)
    return json_response(await ext.rollouts.abort(model, await _why(request, "latency looks off") or "aborted by hand"))


@router.post("/rollouts/{model}/promote", summary="Promote the candidate now (API key)")
async def promote(request: Request, model: str) -> Response:
    return json_response(await _extension(request).rollouts.promote(model))


@router.post(
    "/rollouts/{model}/rollback",
    summary="Instant rollback of live traffic to the previous production version (API key)",
    openapi_extra=openapi_body(WhyBody, required=False),
)
async def rollback(request: Request, model: str) -> Response:
    ext = _extension(request)
    return json_response(await ext.rollouts.rollback(model, await _why(request, "p99 doubled")))


@router.get("/rollouts/{model}/report", summary="A/B analysis of the candidate against its baseline (API key)")
async def report(request: Request, model: str) -> Response:
    return json_response(await _extension(request).rollouts.report(model))


@router.get("/rollouts/{model}/events", summary="Every recorded decision of the deployment (API key)")
async def events(request: Request, model: str) -> Response:
    manager = _extension(request).rollouts
    ro = manager.get(model)
    if manager.store_for(ro) is None:
        return json_response(list(ro.events))
    rows = await asyncio.to_thread(manager.registry().rollouts.events, model)
    return json_response([r["decision"] | {"recorded_at": r["at"]} for r in rows])


@router.post(
    "/feedback", summary="Report numeric outcomes of answered requests, by request id (API key)", openapi_extra=openapi_body(FeedbackBody)
)
async def feedback(request: Request) -> Response:
    ext = _extension(request)
    doc = await _body(request, FEEDBACK_EXAMPLE)
    items = doc.get("outcomes", [doc]) if "outcomes" in doc else [doc]
    if not isinstance(items, list) or not items or len(items) > MAX_OUTCOMES_PER_REQUEST:
        raise InvalidInputError(
            f"'outcomes' must be a list of 1 to {MAX_OUTCOMES_PER_REQUEST:,} outcomes.",
            hint=f'Example: {{"outcomes": [{FEEDBACK_EXAMPLE}]}}; send more in several requests.',
        )
    recorded = []
    for item in items:
        if not isinstance(item, dict) or "request_id" not in item or "value" not in item:
            raise InvalidInputError("Each outcome needs 'request_id' and 'value'.", hint=f"Example: {FEEDBACK_EXAMPLE}")
        rid, model = item["request_id"], item.get("model")
        if not isinstance(rid, str) or not 0 < len(rid) <= MAX_REQUEST_ID_CHARS or (model is not None and not isinstance(model, str)):
            raise InvalidInputError(
                f"'request_id' must be a string of 1 to {MAX_REQUEST_ID_CHARS} characters (and 'model', when given, a name).",
                hint=f"Example: {FEEDBACK_EXAMPLE}",
            )
        model, version = ext.observations.feedback(rid, item["value"], item.get("metric", "outcome"), model=model)
        recorded.append({"request_id": rid, "model": model, "version": version})
    return json_response({"recorded": recorded})
