"""What every step processor has: the four entry points."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from legato.workflows.context import Run
    from legato.workflows.state import Frame, StepState, Timer


class Processor:
    """What a step kind does when it starts, when a frame below it ends, when its timer fires, when it is
    cancelled, when its failed run is redriven. The defaults do nothing: a kind overrides what applies to it."""

    redrivable = False
    """Whether ``redrive`` runs a failed step of this kind again (the machine refuses to redrive other kinds)."""

    def start(self, run: "Run", step: "StepState", definition: Any, frame: "Frame", variables: dict[str, Any]) -> None:
        raise NotImplementedError

    def child_finished(self, run: "Run", step: "StepState", definition: Any, frame: "Frame") -> None:
        """A frame started by ``step`` (a branch, a path, an iteration, a fallback) finished."""

    def timer(self, run: "Run", step: "StepState", timer: "Timer") -> None:
        """One of ``step``'s timers fired (already removed from the run's timers)."""

    def redrive(self, run: "Run", step: "StepState", definition: Any) -> None:
        """The run failed at ``step`` (reopened: running again) and is redriven: run it again."""
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
