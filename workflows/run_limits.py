"""A run's side of cluster-wide limits (docs/limits.md): acquisitions, grants and releases.

A step with ``limit:`` does not send its request when it is ready: it sends an acquisition (``AcquireLimit``) and
holds the request in its state (``limit_hold.waiting``) until the limiter's ``LimitGranted`` comes back; its
``timeout`` and ``start_timeout`` run from the acquisition on, so the time waiting for a limit counts. Whatever ends
the attempt (its completion, a deadline, a cancellation, the run's end) releases the acquisition once, with the
tokens the completion reports and, after a 429 (``RateLimited`` with ``retry_after``), a pause of the whole key. A
workflow's ``concurrency`` key is the same mechanism for the run itself: its root frame starts when it is granted.

A grant nobody waits for (the attempt timed out meanwhile, the run finished or was forgotten) is released at once,
so a limit never leaks a place.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from legato.topics.limits import PRIORITY_DEFAULT, RUN_LIMIT_PREFIX, LimitAcquire, LimitGranted, LimitRelease, LimitSpec
from legato.topics.models import ActivityRequested, ErrorInfo
from legato.workflows.commands import AcquireLimit, EventIgnored, ReleaseLimit, RequestActivity
from legato.workflows.expressions import ExpressionError
from legato.workflows.model import ActivityStep

if TYPE_CHECKING:
    from legato.workflows.context import Run
    from legato.workflows.state import RunState, StepState

GRANT_TTL_MS = 500
"""A rate grant decided more than this after the limiter gave it is given back and asked for again instead of used:
grants that waited on the coordinator topic (a takeover after a coordinator SIGKILL, a partition far behind) would
otherwise reach the workers together and overrun the rate. Concurrency-only limits and run concurrency keys hold a
place, not a moment, so their grants never go stale."""

LATE_GRANTS_MAX = 3
"""After this many late grants for one attempt the next one is used whatever its age, so an attempt cannot be starved
by a coordinator that is always late (or a clock far ahead of the limiter's); each case is counted as
``late_grant_used``."""


def acquire_for_step(run: "Run", step: "StepState", definition: ActivityStep, request: ActivityRequested, variables: dict[str, Any]) -> ErrorInfo | None:
    """Ask for ``definition.limit`` before ``request`` goes out (the caller holds the request back); an error when the
    limit is unknown or its key cannot be evaluated."""
    assert definition.limit is not None
    spec = run.limit(definition.limit)
    if spec is None:
        return ErrorInfo(type="UnknownLimit", message=f"no limit named {definition.limit!r} in the workflow or deployed", retryable=False)
    try:
        key = _text(run.wf.templates[f"{definition.id}:limit_key"].render(variables, run.claims)) if definition.limit_key is not None else ""
        cost = _tokens(run, definition, variables)
    except ExpressionError as exc:
        return ErrorInfo(type="ExpressionError", message=f"step {definition.id}: {exc}", retryable=False)
    step.limit_hold = {"id": request.request_id, "limit": definition.limit, "key": key, "cost": cost, "waiting": True, "since_ms": run.now,
                       "spec": spec.model_dump(exclude_none=True)}
    run.out.append(AcquireLimit(acquire=LimitAcquire(id=request.request_id, limit=definition.limit, key=key, run_id=run.state.run_id,
                                                     priority=run.state.priority or PRIORITY_DEFAULT, cost=cost,
                                                     spec=LimitSpec(**spec.model_dump()), requested_ms=run.now)))
    return None


def acquire_for_run(run: "Run", triggered_ms: int | None = None) -> bool:
    """Ask for the workflow's run concurrency key; True when the run must wait for its grant. Its wait counts from
    ``triggered_ms`` (the trigger record's time), so runs of one key start in trigger order although their triggers
    are decided on several partitions, each at its own pace."""
    concurrency = run.wf.definition.concurrency
    if concurrency is None:
        return False
    key = _text(run.wf.templates["run:concurrency"].render({"input": run.state.input, "steps": {}}, run.claims))
    hold_id = RUN_LIMIT_PREFIX + run.state.run_id
    limit = RUN_LIMIT_PREFIX + run.state.workflow
    since = min(run.now, triggered_ms) if triggered_ms else run.now
    run.state.limit_hold = {"id": hold_id, "limit": limit, "key": key, "cost": 0, "waiting": True, "since_ms": since,
                            "spec": {"concurrency": concurrency.limit}}
    run.out.append(AcquireLimit(acquire=LimitAcquire(id=hold_id, limit=limit, key=key, run_id=run.state.run_id, priority=run.state.priority or PRIORITY_DEFAULT,
                                                     spec=LimitSpec(concurrency=concurrency.limit), requested_ms=since)))
    return True


def granted(run: "Run", event: LimitGranted) -> None:
    """The limiter admitted acquisition ``event.id``: send the step's request, or start the run's root frame."""
    state = run.state
    hold = state.limit_hold
    if hold is not None and hold["id"] == event.id and hold["waiting"]:
        hold["waiting"] = False
        run.advance("root")
        return
    for key, step in state.steps.items():
        hold = step.limit_hold
        if hold is not None and hold["id"] == event.id and hold["waiting"] and step.request is not None:
            if _late(run, hold, event):
                return
            hold["waiting"] = False
            state.requests[event.id] = key
            run.out.append(RequestActivity(request=ActivityRequested.model_validate(step.request)))
            return
    unwanted(run.out, event, state.run_id)
    run.changed = False


def _late(run: "Run", hold: dict[str, Any], event: LimitGranted) -> bool:
    """A rate grant decided ``GRANT_TTL_MS`` or more after it was given: give it back (nothing ran: no tokens) and ask
    again, keeping the place in the queue the attempt earned (``since_ms``); True when so."""
    spec = hold.get("spec") or {}
    rated = spec.get("requests_per_minute") is not None or spec.get("tokens_per_minute") is not None
    age = run.now - event.granted_ms
    if not rated or age < GRANT_TTL_MS:
        return False
    late = int(hold.get("late", 0))
    if late >= LATE_GRANTS_MAX:
        run.out.append(EventIgnored(run_id=run.state.run_id, reason="late_grant_used", detail=f"{event.limit} ({event.key}) for {event.id}, {age} ms old"))
        return False
    hold["late"] = late + 1
    run.out.append(ReleaseLimit(release=LimitRelease(id=event.id, limit=event.limit, key=event.key, cost=0, late=True)))
    run.out.append(EventIgnored(run_id=run.state.run_id, reason="late_grant", detail=f"{event.limit} ({event.key}) for {event.id}, {age} ms old"))
    run.out.append(AcquireLimit(acquire=LimitAcquire(id=hold["id"], limit=hold["limit"], key=hold["key"], run_id=run.state.run_id,
                                                     priority=run.state.priority or PRIORITY_DEFAULT, cost=hold.get("cost", 0),
                                                     spec=LimitSpec(**spec), requested_ms=hold.get("since_ms", run.now))))
    run.changed = True
    return True


def unwanted(out: list[Any], event: LimitGranted, run_id: str) -> None:
    """A grant nobody waits for: give it back at once, and count it."""
    out.append(ReleaseLimit(release=LimitRelease(id=event.id, limit=event.limit, key=event.key)))
    out.append(EventIgnored(run_id=run_id, reason="stale_grant", detail=f"{event.limit} ({event.key}) for {event.id}"))


def release(run: "Run", holder: "StepState | RunState", cost: int | None = None, pause_ms: int | None = None) -> None:
    """``holder``'s acquisition ended (granted or still waiting): give it back, once."""
    hold = holder.limit_hold
    if hold is None:
        return
    holder.limit_hold = None
    run.out.append(ReleaseLimit(release=LimitRelease(id=hold["id"], limit=hold["limit"], key=hold["key"], cost=cost, pause_ms=pause_ms)))


def waiting_for(hold: dict[str, Any] | None) -> str | None:
    """``openai (tenant acme)`` style text of an acquisition still waiting, or None."""
    if not hold or not hold.get("waiting"):
        return None
    return f"{hold['limit']} ({hold['key']})" if hold.get("key") else str(hold["limit"])


def outstanding_acquisitions(state: "RunState") -> list[AcquireLimit]:
    """The acquisitions still waiting, to send again after a crash (the limiter ignores one it already has)."""
    out = []
    holders: list[Any] = [state, *state.steps.values()]
    for holder in holders:
        hold = holder.limit_hold
        if hold is not None and hold.get("waiting") and hold.get("spec"):
            out.append(AcquireLimit(acquire=LimitAcquire.model_validate({**hold, "run_id": state.run_id, "priority": state.priority or PRIORITY_DEFAULT,
                                                                          "requested_ms": hold.get("since_ms", 0)})))
    return out


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _tokens(run: "Run", definition: ActivityStep, variables: dict[str, Any]) -> int:
    if definition.approx_tokens is None:
        return 0
    value = definition.approx_tokens if isinstance(definition.approx_tokens, int) else run.wf.templates[f"{definition.id}:approx_tokens"].render(variables, run.claims)
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        raise ExpressionError(f"approx_tokens gave {value!r}, not a number") from None
