"""``sleep:`` steps: a durable pause (a timer like every other), for a duration or until an instant.

The step passes the previous step's output on, so a sleep between two steps changes nothing but the time.
"""
from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from legato.workflows import keys
from legato.workflows.expressions import ExpressionError
from legato.workflows.model import SleepStep, SleepUntil
from legato.workflows.state import StepState, Timer
from legato.workflows.steps.base import Processor

if TYPE_CHECKING:
    from legato.workflows.context import Run
    from legato.workflows.state import Frame, RunState


class SleepProcessor(Processor):
    def start(self, run: "Run", step: StepState, definition: SleepStep, frame: "Frame", variables: dict[str, Any]) -> None:
        step.output = frame.last_output
        if isinstance(definition.sleep, SleepUntil):
            due = _instant(run.wf.expr(f"{definition.id}.until").evaluate(variables, run.claims), definition.sleep.until)
        else:
            due = run.now + round(definition.sleep * 1000)
        if due <= run.now:
            run.finish_step(step, "succeeded")
            return
        run.set_timer_at(keys.sleep_timer(step.key, run.state.redrives), due, "sleep", target=step.key)

    def redrive_frames(self, state: "RunState", step: StepState, definition: SleepStep) -> list["Frame"]:
        return []

    def redrive(self, run: "Run", step: StepState, definition: SleepStep) -> None:
        """Sleep again: the whole duration from now, or until the same instant."""
        frame = run.state.frames[step.frame]
        self.start(run, step, definition, frame, run.variables(frame))

    def timer(self, run: "Run", step: StepState, timer: Timer) -> None:
        if timer.kind == "sleep" and step.status == "running":
            run.finish_step(step, "succeeded")

    def cancel(self, run: "Run", step: StepState, reason: str) -> bool:
        run.clear_timer(keys.sleep_timer(step.key, run.state.redrives))
        return False


def _instant(value: Any, source: str) -> int:
    """Epoch milliseconds from what ``until`` gave: a number of epoch ms, an RFC 3339 timestamp, or a CEL
    ``timestamp``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, datetime) and value.tzinfo is not None:
        return round(value.timestamp() * 1000)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ExpressionError(f"sleep until {source!r} gave {value!r}, not an RFC 3339 timestamp") from None
        if moment.tzinfo is None:
            raise ExpressionError(f"sleep until {source!r} gave {value!r} without a time zone")
        return round(moment.timestamp() * 1000)
    raise ExpressionError(f"sleep until {source!r} gave {type(value).__name__}, not epoch ms or an RFC 3339 timestamp")
