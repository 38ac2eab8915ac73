"""Pure decisions of a run's lifecycle that need no step processor: who may be redriven, what a fork copies, when a
finished run is forgotten. The state machine calls these (docs/concepts/runs.md).
"""
from __future__ import annotations

from typing import Any

from legato.topics.models import ForkedStep, RunForkAccepted, RunForkRequested
from legato.workflows.catalog import Definition
from legato.workflows.model import CompiledWorkflow
from legato.workflows.state import RunState

DEFAULT_RETENTION_S = 7 * 24 * 3600.0
"""How long a finished run stays in the run table when neither its workflow nor LEGATO_RETENTION says."""

_FINISHED_AND_PROCEEDED = ("succeeded", "skipped", "failed", "timed_out")
"""Statuses of a top-level step that ended; a failed one counts only when the run went on past it (on_error:
continue or a default value)."""


def redrive_refusal(state: RunState | None) -> str | None:
    """Why a redrive of this run changes nothing, or None when it resumes (a named guard: the refusal is counted)."""
    if state is None:
        return "unknown run (or forgotten after its retention)"
    if state.status != "failed":
        return f"the run is {state.status}: only a failed run can be redriven"
    if state.parent:
        return f"a child run of {state.parent.get('run_id')}: redrive its parent, which starts a fresh child run"
    if "root" not in state.frames:
        error = state.error.type if state.error else "no step started"
        return f"the run never started a step ({error}): trigger it again"
    if state.error is not None and state.error.type == "budget_exceeded":
        return "the run spent its budget (its cost is kept): it would fail again at its next step"
    return None


def retention_ms(workflow: CompiledWorkflow | None, default_s: float = DEFAULT_RETENTION_S) -> int:
    """How long a finished run of ``workflow`` is kept: its ``retention``, else the default (LEGATO_RETENTION)."""
    retention = getattr(workflow.definition, "retention", None) if workflow is not None else None
    return round((default_s if retention is None else retention) * 1000)


def fork_seed(source: RunState, definition: Definition, request: RunForkRequested) -> RunForkAccepted | str:
    """The seed of a run forked from ``source`` at the top-level step ``request.from_step``, or why it is refused.

    ``definition`` is the one ``source`` is pinned to. Every top-level step before ``from_step`` must have ended and
    let the run go on; each is copied with the steps nested in it (what CEL sees as ``steps.<id>``), its cost and the
    choices it took. Steps dropped from the source's state (finished loop iterations and map items) are not copied:
    their parent step's output holds their results.
    """
    wf = definition.workflow
    root = wf.sequences["root"]
    ids = [step.id for step in root]
    if request.from_step not in ids:
        where = "a nested step" if request.from_step in wf.steps else "no step"
        return f"{request.from_step!r} is {where} of {definition.key}: fork from one of its top-level steps ({', '.join(ids)})"
    copied: list[ForkedStep] = []
    for i, step_id in enumerate(ids[: ids.index(request.from_step)]):
        step = source.steps.get(step_id)
        proceeded = step is not None and step.status in _FINISHED_AND_PROCEEDED and ids[i + 1] in source.steps
        if not proceeded:
            status = step.status if step is not None else "not started"
            return f"step {step_id!r} did not finish in run {source.run_id} ({status}): fork from it or an earlier step"
        copied.append(_forked(step_id, source.view[step_id], _cost_within(source, step_id), step.path))
        copied += [_forked(n, source.view[n], None, None) for n in _nested(wf, step_id) if n in source.view]
    return RunForkAccepted(
        run_id=request.new_run_id,
        workflow=definition.name,
        version=definition.version,
        sha256=definition.sha256,
        input=source.input if request.input is None else request.input,
        correlation_id=source.correlation_id,
        forked_from={"run_id": source.run_id, "step": request.from_step},
        steps=copied,
    )


def _forked(step_id: str, entry: dict[str, Any], cost: dict[str, Any] | None, path: str | None) -> ForkedStep:
    status = entry.get("status")
    return ForkedStep(
        step_id=step_id,
        status=status if status in _FINISHED_AND_PROCEEDED else "failed",
        output=entry.get("output"),
        confidence=entry.get("confidence"),
        cached=bool(entry.get("cached")),
        cost=cost,
        path=path,
    )


def _cost_within(source: RunState, step_id: str) -> dict[str, Any] | None:
    """What a top-level step and the steps still held inside it cost (keys ``<id>``, ``<id>/…``, ``<id>#…``,
    ``<id>[…``)."""
    prefixes = (step_id + "/", step_id + "#", step_id + "[")
    total: dict[str, Any] = {}
    for step in source.steps.values():
        if step.cost and (step.key == step_id or step.key.startswith(prefixes)):
            for field in ("usd", "tokens_in", "tokens_out"):
                if field in step.cost:
                    total[field] = total.get(field, 0) + step.cost[field]
            for model, usd in (step.cost.get("models") or {}).items():
                total.setdefault("models", {})[model] = total.get("models", {}).get(model, 0) + usd
    if "usd" in total:
        total["usd"] = round(total["usd"], 9)
    return total or None


def _nested(wf: CompiledWorkflow, step_id: str) -> list[str]:
    """Ids of every step inside ``step_id`` (branches, items, paths, loop bodies, fallbacks), depth first."""
    out: list[str] = []
    for ref, steps in wf.sequences.items():
        if ref.startswith(step_id + "/"):
            for step in steps:
                out += [step.id, *_nested(wf, step.id)]
    return out
