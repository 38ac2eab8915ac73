"""``choice:`` steps: take the first case whose condition holds, or the route an expression names, or default."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from legato.workflows import keys, transitions
from legato.workflows.model import ChoiceStep
from legato.workflows.state import StepState
from legato.workflows.steps.base import Processor, finish_with_frame, unfinished_frames

if TYPE_CHECKING:
    from legato.workflows.context import Run
    from legato.workflows.state import Frame, RunState


ROUTE_NAME_MAX = 100
"""Characters of an undeclared route's name kept on the run's path."""


class ChoiceProcessor(Processor):
    def start(self, run: "Run", step: StepState, definition: ChoiceStep, frame: "Frame", variables: dict[str, Any]) -> None:
        path, route = _choose(run, definition, variables)
        transitions.take_path(run, step, path, route)
        child = run.child_frame(step, keys.branch_frame(step.key, path), keys.sequence_ref(definition.id, path), frame)
        run.advance(child.id)

    def child_finished(self, run: "Run", step: StepState, definition: Any, frame: "Frame") -> None:
        finish_with_frame(run, step, frame)

    def redrive_frames(self, state: "RunState", step: StepState, definition: ChoiceStep) -> list["Frame"] | str:
        """The path it took, from its step that failed (the path is not chosen again)."""
        return unfinished_frames(state, step) or f"nothing failed inside the choice step {step.step_id!r}: trigger the run again"

    def redrive(self, run: "Run", step: StepState, definition: ChoiceStep) -> None:
        for frame in unfinished_frames(run.state, step):
            run.resume_frame(frame)


def _choose(run: "Run", definition: ChoiceStep, variables: dict[str, Any]) -> tuple[str, str | None]:
    """The path to take, and the undeclared route an expression named (the choice then takes ``default``)."""
    spec = definition.choice
    if spec.route:
        name = run.wf.expr(f"{definition.id}.route").evaluate(variables, run.claims)
        if isinstance(name, str) and name in spec.routes:
            return f"route:{name}", None
        return "default", (name if len(name) <= ROUTE_NAME_MAX else name[:ROUTE_NAME_MAX] + "…") if isinstance(name, str) else None
    for i in range(len(spec.cases)):
        if run.truth(f"{definition.id}.when.{i}", variables):
            return f"case{i}", None
    return "default", None
