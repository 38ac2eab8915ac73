"""``loop:`` steps: run a body again until a condition, a bound, a timeout, no progress or the budget ends it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from legato.topics.models import ErrorInfo
from legato.workflows import keys
from legato.workflows.expressions import ExpressionError
from legato.workflows.model import ENGINE_MAX_ITERATIONS, LoopStep
from legato.workflows.state import StepState, Timer
from legato.workflows.steps.base import Processor, finish_with_frame, unfinished_frames

if TYPE_CHECKING:
    from legato.workflows.context import Run
    from legato.workflows.state import Frame, RunState


class LoopProcessor(Processor):
    def start(self, run: "Run", step: StepState, definition: LoopStep, frame: "Frame", variables: dict[str, Any]) -> None:
        spec = definition.loop
        scope: dict[str, Any] = {"iteration": 0, "previous": None}
        if spec.for_each is not None:
            items = run.wf.expr(f"{definition.id}.for_each").evaluate(variables, run.claims)
            if not isinstance(items, list):
                raise ExpressionError(f"for_each {spec.for_each!r} gave {type(items).__name__}, not a list")
            step.items = items
            step.total = -(-len(items) // spec.batch_size)
            if step.total == 0:
                step.ended_by = "items"
                run.finish_step(step, "succeeded", output=None)
                return
            scope.update(item=items[: spec.batch_size], index=0)
        step.iteration = 0
        if spec.timeout is not None:
            run.set_timer(keys.loop_timeout(step.key, run.state.redrives), spec.timeout, "loop_timeout", target=step.key)
        child = run.child_frame(step, keys.iteration_frame(step.key, 0), keys.sequence_ref(definition.id, "body"), frame, **scope)
        run.advance(child.id)

    def child_finished(self, run: "Run", step: StepState, definition: LoopStep, frame: "Frame") -> None:
        if frame.id == keys.exhausted_frame(step.key):
            finish_with_frame(run, step, frame)
            return
        spec = definition.loop
        if frame.status != "succeeded":
            step.ended_by = "failed"
            run.clear_timer(keys.loop_timeout(step.key, run.state.redrives))
            run.failed_finally(step, frame.error, "failed")
            return
        previous = frame.scope.get("previous")
        step.output, step.confidence = frame.last_output, frame.last_confidence
        iteration = step.iteration or 0
        if spec.until is not None:
            variables = {**run.variables(frame), "iteration": iteration}
            try:
                done = run.truth(f"{definition.id}.until", variables)
            except ExpressionError as exc:
                step.ended_by = "failed"
                run.clear_timer(keys.loop_timeout(step.key, run.state.redrives))
                run.failed_finally(step, ErrorInfo(type="ExpressionError", message=f"step {definition.id}: {exc}", retryable=False), "failed")
                return
            if done:
                run.clear_timer(keys.loop_timeout(step.key, run.state.redrives))
                step.ended_by = "until"
                run.finish_step(step, "succeeded")
                return
        step.unchanged = step.unchanged + 1 if iteration > 0 and frame.last_output == previous else 0
        if spec.no_progress is not None and step.unchanged >= spec.no_progress:
            _exhausted(run, step, "no_progress", step.output)
            return
        if run.state.budget_exhausted:
            _exhausted(run, step, "budget", step.output)
            return
        if spec.for_each is not None and iteration + 1 >= step.total:
            run.clear_timer(keys.loop_timeout(step.key, run.state.redrives))
            step.ended_by = "items"
            run.finish_step(step, "succeeded")
            return
        if iteration + 1 >= min(spec.bound if spec.for_each is None or spec.max_iterations else ENGINE_MAX_ITERATIONS, ENGINE_MAX_ITERATIONS):
            _exhausted(run, step, "max_iterations", step.output)
            return
        step.iteration = iteration + 1
        parent = run.state.frames[step.frame]
        scope: dict[str, Any] = {"iteration": iteration + 1, "previous": frame.last_output}
        if spec.for_each is not None:
            start = (iteration + 1) * spec.batch_size
            scope.update(item=(step.items or [])[start : start + spec.batch_size], index=iteration + 1)
        run.drop_frame(frame)  # the iteration's results live on in step.output and `previous`
        child = run.child_frame(step, keys.iteration_frame(step.key, iteration + 1), keys.sequence_ref(definition.id, "body"), parent, **scope)
        run.advance(child.id)

    def redrive_frames(self, state: "RunState", step: StepState, definition: LoopStep) -> list["Frame"] | str:
        """Its ``on_exhausted`` steps when they failed; else the iteration that failed or was cancelled (a timeout, a
        sibling's failure), from its step that failed, with the loop's counters as they were. A loop that failed on
        its own (a bound with ``on_exhausted: fail``, its ``until``) would end the same way again."""
        frames = unfinished_frames(state, step)
        exhausted = [f for f in frames if f.id == keys.exhausted_frame(step.key)]
        if exhausted or frames:
            return exhausted or frames
        error = f"{step.error.type}: {step.error.message}" if step.error else "failed"
        return f"the loop {step.step_id!r} ended by {step.ended_by or 'failed'} ({error}), not in a step of its body: it would end the same way again: trigger the run again"

    def redrive(self, run: "Run", step: StepState, definition: LoopStep) -> None:
        frames = self.redrive_frames(run.state, step, definition)
        assert not isinstance(frames, str), frames  # the machine's guard refused it
        if frames[0].id != keys.exhausted_frame(step.key):  # iterating again: its timeout restarts
            step.ended_by = None
            if definition.loop.timeout is not None:
                run.set_timer(keys.loop_timeout(step.key, run.state.redrives), definition.loop.timeout, "loop_timeout", target=step.key)
        for frame in frames:
            run.resume_frame(frame)

    def timer(self, run: "Run", step: StepState, timer: Timer) -> None:
        if timer.kind == "loop_timeout" and step.status == "running":
            run.cancel_children(step, "loop timeout")
            _exhausted(run, step, "timeout", step.output)

    def cancel(self, run: "Run", step: StepState, reason: str) -> bool:
        run.clear_timer(keys.loop_timeout(step.key, run.state.redrives))
        return False


def _exhausted(run: "Run", step: StepState, bound: str, output: Any) -> None:
    spec = run.wf.steps[step.step_id].loop
    run.clear_timer(keys.loop_timeout(step.key, run.state.redrives))
    step.ended_by = bound
    if bound == "budget" or (spec.until is None and spec.for_each is None and bound == "max_iterations" and spec.no_progress is None):
        run.finish_step(step, "succeeded", output=output)  # a counted loop ran to its end; a budget stop keeps what it has
    elif spec.on_exhausted == "continue":
        run.finish_step(step, "succeeded", output=output)
    elif isinstance(spec.on_exhausted, list):
        child = run.child_frame(step, keys.exhausted_frame(step.key), keys.sequence_ref(step.step_id, "exhausted"), run.state.frames[step.frame], previous=output)
        run.advance(child.id)
    else:
        error = ErrorInfo(
            type="LoopExhausted",
            message=f"loop {step.step_id} reached {bound} after {(step.iteration or 0) + 1} iterations without meeting `until`",
            retryable=False,
        )
        run.failed_finally(step, error, "failed")
