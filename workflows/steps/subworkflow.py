"""``workflow:`` steps: a child run through the same topics; the step resumes on the child's terminal event."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from legato.topics.models import ChildRunFinished, ErrorInfo, RunAccepted, RunCancelRequested
from legato.workflows import keys, transitions
from legato.workflows.commands import CancelChildRun, StartChildRun
from legato.workflows.model import WorkflowStep
from legato.workflows.state import StepState, Timer
from legato.workflows.steps.base import Processor

if TYPE_CHECKING:
    from legato.workflows.context import Run
    from legato.workflows.state import Frame, RunState


class SubWorkflowProcessor(Processor):
    def redrive_frames(self, state: "RunState", step: StepState, definition: WorkflowStep) -> list["Frame"]:
        return []

    def start(self, run: "Run", step: StepState, definition: WorkflowStep, frame: "Frame", variables: dict[str, Any]) -> None:
        self._start_child(run, step, definition, variables, keys.child_run_id(run.state.run_id, step.key), 1)

    def redrive(self, run: "Run", step: StepState, definition: WorkflowStep) -> None:
        """A fresh child run (the failed one's late ``child.finished`` is stale), with the step's input rendered again."""
        child_id = f"{keys.child_run_id(run.state.run_id, step.key)}~{run.state.redrives}"
        self._start_child(run, step, definition, run.variables(run.state.frames[step.frame]), child_id, step.attempt + 1)

    def _start_child(self, run: "Run", step: StepState, definition: WorkflowStep, variables: dict[str, Any], child_id: str, attempt: int) -> None:
        payload = run.wf.templates[definition.id].render(variables, run.claims)
        if not isinstance(payload, dict):
            payload = {"value": payload} if payload is not None else {}
        accepted = RunAccepted(
            run_id=child_id,
            workflow=definition.workflow,
            version=definition.version,
            input=payload,
            correlation_id=run.state.correlation_id,
            parent={"run_id": run.state.run_id, "step_key": step.key, "depth": run.state.depth + 1},
        )
        transitions.move(run, step, "running")
        step.attempt, step.child_run = attempt, child_id
        step.request = accepted.model_dump(mode="json", exclude_none=True)
        run.out.append(StartChildRun(accepted=accepted))
        if definition.timeout is not None:
            run.set_timer(keys.attempt_timeout(step.key, attempt), definition.timeout, "activity_timeout", target=step.key, attempt=attempt)

    def child_run_finished(self, run: "Run", event: ChildRunFinished) -> None:
        """The child run of one of this run's sub-workflow steps ended."""
        step = run.state.steps.get(event.step_key)
        if step is None or step.child_run != event.child_run_id or step.status != "running" or run.fallback_running(step):
            run.ignore("stale_child", f"child run {event.child_run_id} of step {event.step_key}")
            return
        run.clear_timer(keys.attempt_timeout(step.key, step.attempt))
        if event.cost:
            run.add_cost(step, {k: v for k, v in event.cost.items() if k != "models"}, models=event.cost.get("models"))
        too_big = run.too_big(event.output) if event.status == "succeeded" else None
        if too_big:
            run.failed_finally(step, ErrorInfo(type="ContextTooLarge", message=too_big, retryable=False), "failed")
        elif event.status == "succeeded":
            step.output = event.output
            run.finish_step(step, "succeeded")
        else:
            error = event.error or ErrorInfo(type="ChildRunFailed", message=f"child run {event.child_run_id} failed")
            run.failed_finally(step, ErrorInfo(type=error.type, message=error.message, retryable=False), "failed")
        run.check_budget()

    def timer(self, run: "Run", step: StepState, timer: Timer) -> None:
        if timer.kind == "activity_timeout" and step.status == "running" and step.attempt == timer.attempt:
            self.cancel(run, step, "the step timed out")
            run.failed_finally(step, ErrorInfo(type="ChildRunTimeout", message=f"child run {step.child_run} took longer than the step's timeout", retryable=False), "timed_out")

    def cancel(self, run: "Run", step: StepState, reason: str) -> bool:
        running = child_running(run, step)
        if running:
            run.out.append(CancelChildRun(cancel=RunCancelRequested(run_id=step.child_run, reason=reason, requested_by=run.state.run_id)))
        run.clear_timer(keys.attempt_timeout(step.key, step.attempt))
        return running


def child_running(run: "Run", step: StepState) -> bool:
    """Whether a sub-workflow step still waits for its child run (not for its fallback steps)."""
    return step.kind == "workflow" and step.status == "running" and step.child_run is not None and not run.fallback_running(step)
