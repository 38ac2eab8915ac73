"""The records a run's end sends: its terminal run event, and the ``ChildRunFinished`` its parent run waits for."""
from __future__ import annotations

from datetime import datetime, timezone

from legato.topics.models import ChildRunFinished, RunEvent
from legato.workflows.state import RunState


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def terminal_event(state: RunState) -> RunEvent:
    ok = state.status == "succeeded"
    status = state.status if state.status in ("succeeded", "cancelled") else "failed"
    finished = state.finished_ms or state.started_ms
    return RunEvent(
        type={"succeeded": "run.completed", "cancelled": "run.cancelled"}.get(status, "run.failed"),
        run_id=state.run_id,
        workflow=state.workflow,
        status=status,
        output=state.output if ok else None,
        error=None if ok else state.error,
        started_at=iso(state.started_ms),
        finished_at=iso(finished),
        duration_ms=finished - state.started_ms,
        correlation_id=state.correlation_id,
        path=list(state.path),
        cost=dict(state.cost) or None,
        stopped_by="budget" if ok and state.budget_exhausted else None,
        confidence=state.confidence if ok else None,
        version=state.version or None,
        redrives=state.redrives or None,
        forked_from=state.forked_from,
    )


def parent_waits(state: RunState) -> bool:
    """A finished child run tells its parent, unless the parent cancelled it (the parent has moved on)."""
    return bool(state.parent) and not (state.status == "cancelled" and state.cancelled_by == state.parent.get("run_id"))


def child_finished(state: RunState) -> ChildRunFinished:
    parent = state.parent or {}
    return ChildRunFinished(
        run_id=parent["run_id"],
        step_key=parent["step_key"],
        child_run_id=state.run_id,
        status="succeeded" if state.status == "succeeded" else "failed",
        output=state.output,
        error=state.error,
        cost=dict(state.cost) or None,
    )
