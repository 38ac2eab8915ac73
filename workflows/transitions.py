"""The only place a step's status changes, and the domain events that say what happened.

``move`` checks every change against ``ALLOWED`` (a refused one is a bug in a processor and raises
``IllegalTransition``: the shell dead-letters the event instead of storing a run in a state it cannot be in) and
emits a domain event when a step finishes. Domain events travel next to the commands of a decision
(``Machine.decide_events``); metrics and views read them instead of comparing state snapshots.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from legato.workflows.keys import branch_of
from legato.workflows.state import STEP_FINISHED, Frame, RunState, StepState, StepStatus

if TYPE_CHECKING:
    from legato.workflows.context import Run

ALLOWED: dict[StepStatus, frozenset[StepStatus]] = {
    "running": frozenset({"running", "waiting", "waiting_retry", "succeeded", "failed", "timed_out", "cancelled", "skipped"}),
    "waiting": frozenset({"succeeded", "failed", "timed_out", "cancelled"}),
    "waiting_retry": frozenset({"running", "timed_out", "cancelled"}),
    **{status: frozenset() for status in STEP_FINISHED},
}
"""From a status (key) to the statuses a step may move to. A finished step never moves again; ``running`` to
``running`` is the next attempt of an activity or the fallback of a failed step."""


class IllegalTransition(RuntimeError):
    """A processor tried a move that ``ALLOWED`` refuses."""


# --- domain events (past tense) --------------------------------------------------------------------


class DomainEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    workflow: str


class StepFinished(DomainEvent):
    """A step reached a final status. ``branches``/``concurrent``: a parallel step's potential and achieved
    concurrency; ``signal``: what a wait step waited for."""

    key: str
    step_id: str
    kind: str
    status: StepStatus
    previous: StepStatus  # the status it finished from (``waiting``: a wait that waited for its signal)
    started_ms: int
    finished_ms: int
    error_type: str | None = None
    branches: int | None = None
    concurrent: int | None = None
    signal: str | None = None


class StepWaiting(DomainEvent):
    """A wait step started waiting for a signal (none was kept for it)."""

    key: str
    step_id: str
    signal: str


class PathTaken(DomainEvent):
    """A choice took a path: ``caseN``, ``route:NAME``, ``default``; ``route`` is the route an expression named
    when no such route is declared (the choice then took ``default``)."""

    step_id: str
    path: str
    route: str | None = None


class LoopEnded(DomainEvent):
    step_id: str
    ended_by: str  # until | max_iterations | items | timeout | no_progress | budget | failed
    iterations: int


class AttemptTimedOut(DomainEvent):
    """An activity attempt ran out of one of its deadlines: ``timeout``, ``start_timeout``, ``run_timeout`` or
    ``heartbeat`` (whether a retry follows or the step fails, ``StepFinished`` says)."""

    step_id: str
    deadline: str


class AttemptRateLimited(DomainEvent):
    """An activity attempt failed with error type ``RateLimited`` (an API's 429), retried or not."""

    step_id: str


class RunFinished(DomainEvent):
    status: str  # succeeded | failed | cancelled
    error_type: str | None = None
    started_ms: int
    finished_ms: int
    cost: dict[str, Any] | None = None
    top_level: bool = True  # not a sub-workflow's run (its cost is also in its parent's)
    workflow_loaded: bool = True  # False: triggered for a workflow that is not loaded


class SignalIgnored(DomainEvent):
    """A signal that completed no wait and was not kept: duplicate_signal | unknown_run | run_finished |
    too_many_signals."""

    signal: str
    reason: str


# --- transitions -----------------------------------------------------------------------------------


def begin(run: "Run", definition_id: str, kind: str, frame: Frame, key: str) -> StepState:
    """A step starts in ``frame`` (status ``running``)."""
    step = StepState(key=key, step_id=definition_id, kind=kind, frame=frame.id, started_ms=run.now)
    if "iteration" in frame.scope:
        step.iteration = frame.scope["iteration"]
    run.state.steps[key] = step
    frame.step_keys.append(key)
    run.grow(run.STEP_BYTES)
    return step


def reopen(run: "Run", step: StepState) -> None:
    """A redrive (``RunRedriveRequested``): the one move out of a final status, for a step that failed, timed out or
    was cancelled when its run failed. Its processor then runs it again (``Processor.redrive``)."""
    if step.status not in ("failed", "timed_out", "cancelled"):
        raise IllegalTransition(f"run {run.state.run_id}: step {step.key} ({step.kind}) cannot be redriven from {step.status}")
    step.status = "running"
    step.error = None
    step.finished_ms = None


def move(run: "Run", step: StepState, status: StepStatus) -> None:
    """Change ``step``'s status; a final one is stamped, shown to CEL (``steps.<id>``) and emitted."""
    if status not in ALLOWED[step.status]:
        raise IllegalTransition(f"run {run.state.run_id}: step {step.key} ({step.kind}) cannot go from {step.status} to {status}")
    previous = step.status
    step.status = status
    if status == "waiting" and previous != "waiting":
        run.events.append(StepWaiting(run_id=run.state.run_id, workflow=run.state.workflow, key=step.key, step_id=step.step_id, signal=step.signal or ""))
    if status not in STEP_FINISHED:
        return
    step.finished_ms = run.now
    update_view(run.state, step)
    branches = concurrent = None
    if step.kind == "parallel" and status in ("succeeded", "failed", "timed_out") and step.children:
        branches, concurrent = parallel_concurrency(run.state, step, run.now)
    run.events.append(
        StepFinished(
            run_id=run.state.run_id,
            workflow=run.state.workflow,
            key=step.key,
            step_id=step.step_id,
            kind=step.kind,
            status=status,
            previous=previous,
            started_ms=step.started_ms,
            finished_ms=run.now,
            error_type=step.error.type if step.error is not None else None,
            branches=branches,
            concurrent=concurrent,
            signal=step.signal,
        )
    )
    if step.kind == "loop" and status not in ("cancelled", "skipped"):
        ended_by = step.ended_by or ("failed" if status in ("failed", "timed_out") else "until")
        run.events.append(LoopEnded(run_id=run.state.run_id, workflow=run.state.workflow, step_id=step.step_id, ended_by=ended_by, iterations=(step.iteration or 0) + 1))


def take_path(run: "Run", step: StepState, path: str, route: str | None = None) -> None:
    """A choice step took ``path`` (recorded on the run's path as ``<step id>:<path>``; when an expression named a
    route that is not declared, as ``<step id>:default(<that name>)``)."""
    step.path = path
    run.state.path.append(f"{step.step_id}:{path}" if route is None else f"{step.step_id}:{path}({route})")
    run.events.append(PathTaken(run_id=run.state.run_id, workflow=run.state.workflow, step_id=step.step_id, path=path, route=route))


def run_finished(run: "Run") -> None:
    """Emit the end of the run (its status is already set)."""
    state = run.state
    run.events.append(
        RunFinished(
            run_id=state.run_id,
            workflow=state.workflow,
            status=state.status,
            error_type=state.error.type if state.error is not None else None,
            started_ms=state.started_ms,
            finished_ms=state.finished_ms if state.finished_ms is not None else run.now,
            cost=dict(state.cost) or None,
            top_level=state.parent is None,
            workflow_loaded=not (state.version == 0 and state.error is not None and state.error.type == "UnknownWorkflow"),
        )
    )


def update_view(state: RunState, step: StepState) -> None:
    """What CEL sees as ``steps.<id>``: the latest finished execution of the step."""
    state.view[step.step_id] = {
        "output": step.output,
        "status": step.status,
        "confidence": step.confidence,
        "attempt": step.attempt,
        "cached": step.cached,
    }


def parallel_concurrency(state: RunState, step: StepState, now_ms: int) -> tuple[int, int]:
    """(potential, achieved) concurrency of a parallel step.

    Potential: its number of branches. Achieved: the most branches that had an activity in flight at one
    instant, from the activity steps' started/finished timestamps (intervals are half-open; every attempt of a
    step counts from the step's start).
    """
    branches = list(step.children)
    intervals: dict[str, list[tuple[int, int]]] = {branch_of(b): [] for b in branches}
    for other in state.steps.values():
        if other.kind != "activity" or other.attempt < 1:
            continue
        for branch in branches:
            if other.key.startswith(branch + "/"):
                end = other.finished_ms if other.finished_ms is not None else now_ms
                intervals[branch_of(branch)].append((other.started_ms, max(end, other.started_ms + 1)))
                break
    starts = sorted({s for spans in intervals.values() for s, _ in spans})
    achieved = 0
    for t in starts:
        active = sum(1 for spans in intervals.values() if any(s <= t < e for s, e in spans))
        achieved = max(achieved, active)
    potential = max(step.total or 0, len({branch_of(b) for b in branches}))
    return potential, achieved
