"""A run's timers, as a decision in progress (``Run``) sets, clears and fires them."""
from __future__ import annotations

from legato.topics.models import ErrorInfo
from legato.workflows.commands import StartTimer
from legato.workflows.state import Timer, TimerKind
from legato.workflows.steps import processor


class RunTimers:
    """Part of ``Run`` (``legato.workflows.context``): a timer is held in the run's state and armed by a
    ``StartTimer`` command; when it fires, its step's processor (or the run itself, for its timeout) decides."""

    def on_timer(self, timer_id: str) -> None:
        timer = self.state.timers.pop(timer_id, None)
        if timer is None:
            self.ignore("stale_timer", f"timer {timer_id} is not pending")
            return
        if timer.kind == "run_timeout":
            self.finish_run(False, None, ErrorInfo(type="RunTimeout", message="the run exceeded its timeout", retryable=False))
            return
        step = self.state.steps.get(timer.target or "")
        if step is not None:
            processor(step.kind).timer(self, step, timer)

    def set_timer(self, timer_id: str, seconds: float, kind: TimerKind, target: str | None = None, attempt: int | None = None) -> None:
        self.set_timer_at(timer_id, self.now + round(seconds * 1000), kind, target, attempt)

    def set_timer_at(self, timer_id: str, due_ms: int, kind: TimerKind, target: str | None = None, attempt: int | None = None) -> None:
        self.state.timers[timer_id] = Timer(due_ms=due_ms, kind=kind, target=target, attempt=attempt)
        self.out.append(StartTimer(run_id=self.state.run_id, timer_id=timer_id, due_ms=due_ms))

    def clear_timer(self, timer_id: str) -> None:
        self.state.timers.pop(timer_id, None)
