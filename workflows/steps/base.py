"""What every step processor has: the four entry points, and the two of a redrive."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from legato.workflows import keys

if TYPE_CHECKING:
    from legato.workflows.context import Run
    from legato.workflows.state import Frame, RunState, StepState, Timer


class Processor:
    """What a step kind does when it starts, when a frame below it ends, when its timer fires, when it is
    cancelled, when its failed run is redriven. The defaults do nothing: a kind overrides what applies to it."""

    def start(self, run: "Run", step: "StepState", definition: Any, frame: "Frame", variables: dict[str, Any]) -> None:
        raise NotImplementedError

    def child_finished(self, run: "Run", step: "StepState", definition: Any, frame: "Frame") -> None:
        """A frame started by ``step`` (a branch, a path, an iteration, a fallback) finished."""

    def timer(self, run: "Run", step: "StepState", timer: "Timer") -> None:
        """One of ``step``'s timers fired (already removed from the run's timers)."""

    def redrive_frames(self, state: "RunState", step: "StepState", definition: Any) -> list["Frame"] | str:
        """What a redrive of ``step`` resumes (a step that failed, timed out or was cancelled when its run failed, or
        that the run's end left running): the frames below it that run again from where they stopped (none for a
        step that runs itself again), or why it cannot be redriven. Pure: the machine's guard and ``redrive`` both
        ask it."""
        return f"the {step.kind} step {step.step_id!r} cannot run again"

    def redrive(self, run: "Run", step: "StepState", definition: Any) -> None:
        """The run is redriven and ``step`` (reopened: running again) runs again: itself, or the frames
        ``redrive_frames`` names (``run.resume_frame``), with its counters and timers as they must be for that."""
        raise NotImplementedError

    def cancel(self, run: "Run", step: "StepState", reason: str) -> bool:
        """Stop what ``step`` waits for and clear its timers; the caller then moves its status. Return whether it
        waited for something outside the run (a request, a child run, a signal): only such steps are marked
        cancelled when the whole run ends."""
        return False


def finish_with_frame(run: "Run", step: "StepState", frame: "Frame") -> None:
    """``step`` ends as its only child frame ended (a choice's path, a fallback, a loop's ``on_exhausted``)."""
    step.output = frame.last_output
    step.confidence = frame.last_confidence
    if frame.status == "succeeded":
        run.finish_step(step, "succeeded")
    else:
        step.error = frame.error
        run.finish_step(step, "failed")


def unfinished_frames(state: "RunState", step: "StepState") -> list["Frame"]:
    """The frames below ``step`` (not its fallback) that failed or were cancelled, in the order they started: what
    a redrive of a compound step runs again."""
    fallback = keys.fallback_frame(step.key)
    frames = [state.frames[f] for f in step.children if f != fallback and f in state.frames]
    return [f for f in frames if f.status in ("failed", "cancelled")]
