"""``end:`` and ``fail:`` steps: end the run early (succeeded with an output, or failed with a reason) when
their condition holds; skipped otherwise."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from legato.topics.models import ErrorInfo
from legato.workflows import transitions
from legato.workflows.model import EndStep, FailStep
from legato.workflows.state import StepState
from legato.workflows.steps.base import Processor

if TYPE_CHECKING:
    from legato.workflows.context import Run
    from legato.workflows.state import Frame, RunState


class EndProcessor(Processor):
    def start(self, run: "Run", step: StepState, definition: EndStep, frame: "Frame", variables: dict[str, Any]) -> None:
        spec = definition.end
        if spec.when is not None and not run.truth(f"{definition.id}.when", variables):
            run.finish_step(step, "skipped", output=frame.last_output)
            return
        output = run.wf.expr(f"{definition.id}.output").evaluate(variables, run.claims) if spec.output else frame.last_output
        step.output = output
        step.confidence = None if spec.output else frame.last_confidence  # an output it computes has no confidence
        transitions.move(run, step, "succeeded")
        run.finish_run(True, output, None, explicit_output=True, confidence=step.confidence)


class FailProcessor(Processor):
    def start(self, run: "Run", step: StepState, definition: FailStep, frame: "Frame", variables: dict[str, Any]) -> None:
        spec = definition.fail
        if spec.when is not None and not run.truth(f"{definition.id}.when", variables):
            run.finish_step(step, "skipped", output=frame.last_output)
            return
        reason = run.wf.expr(f"{definition.id}.reason").evaluate(variables, run.claims)
        step.error = ErrorInfo(type="WorkflowFailed", message=str(reason), retryable=False)
        run.finish_step(step, "failed")

    def redrive_frames(self, state: "RunState", step: StepState, definition: FailStep) -> str:
        reason = step.error.message if step.error else ""
        return f"the run ended at its fail step {step.step_id!r} ({reason}): it would end there again: trigger the run again"
