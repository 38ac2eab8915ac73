"""``wait:`` steps: wait for a named signal sent to the run; the step's output is the signal's data.

A signal completes the oldest wait of the run waiting on its name; if none waits, the run keeps it (up to
``MAX_PENDING_SIGNALS``) for the next wait on that name that starts. A repeated ``signal_id`` is ignored.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from legato.topics.models import ErrorInfo, SignalSent
from legato.workflows import keys, transitions
from legato.workflows.commands import SignalRefused
from legato.workflows.model import DefaultValue, WaitStep
from legato.workflows.state import MAX_PENDING_SIGNALS, MAX_SIGNAL_IDS, PendingSignal, StepState, Timer
from legato.workflows.steps.base import Processor
from legato.workflows.transitions import SignalIgnored

if TYPE_CHECKING:
    from legato.workflows.context import Run
    from legato.workflows.state import Frame, RunState


class WaitProcessor(Processor):
    def start(self, run: "Run", step: StepState, definition: WaitStep, frame: "Frame", variables: dict[str, Any]) -> None:
        spec = definition.wait
        step.signal = spec.signal
        kept = next((s for s in run.state.signals if s.signal == spec.signal), None)
        if kept is not None:  # it came before the wait started
            run.state.signals.remove(kept)
            _deliver(run, step, kept.data)
            return
        transitions.move(run, step, "waiting")
        if spec.timeout is not None:
            run.set_timer(keys.wait_timeout(step.key, run.state.redrives), spec.timeout, "wait_timeout", target=step.key)

    def redrive_frames(self, state: "RunState", step: StepState, definition: WaitStep) -> list["Frame"]:
        return []

    def redrive(self, run: "Run", step: StepState, definition: WaitStep) -> None:
        """Wait again (a signal the run kept since completes it at once), with a fresh timeout."""
        frame = run.state.frames[step.frame]
        self.start(run, step, definition, frame, run.variables(frame))

    def signalled(self, run: "Run", event: SignalSent) -> None:
        """A signal for this run: complete the oldest wait on its name, or keep it for one."""
        state = run.state
        if event.signal_id is not None and event.signal_id in state.signal_ids:
            run.ignore("duplicate_signal", f"signal {event.signal!r} id {event.signal_id!r} was already received")
            run.events.append(SignalIgnored(run_id=state.run_id, workflow=state.workflow, signal=event.signal, reason="duplicate_signal"))
            return
        waiting = next((s for s in state.steps.values() if s.kind == "wait" and s.status == "waiting" and s.signal == event.signal), None)
        if waiting is None and len(state.signals) >= MAX_PENDING_SIGNALS:
            run.changed = False
            run.out.append(SignalRefused(signal=event, reason=f"too many signals: the run already keeps {MAX_PENDING_SIGNALS} that no wait took"))
            run.events.append(SignalIgnored(run_id=state.run_id, workflow=state.workflow, signal=event.signal, reason="too_many_signals"))
            return
        if event.signal_id is not None:
            state.signal_ids.append(event.signal_id)
            del state.signal_ids[:-MAX_SIGNAL_IDS]
        if waiting is None:
            state.signals.append(PendingSignal(signal=event.signal, data=event.data, signal_id=event.signal_id, received_ms=run.now))
            return
        run.clear_timer(keys.wait_timeout(waiting.key, run.state.redrives))
        _deliver(run, waiting, event.data)

    def timer(self, run: "Run", step: StepState, timer: Timer) -> None:
        if timer.kind != "wait_timeout" or step.status != "waiting":
            return
        policy = run.wf.steps[step.step_id].wait.on_timeout
        step.error = ErrorInfo(type="WaitTimeout", message=f"no signal {step.signal!r} came within the step's timeout", retryable=False)
        if isinstance(policy, DefaultValue):
            run.finish_step(step, "timed_out", output=policy.default, proceed=True)
        elif policy == "continue":
            run.finish_step(step, "timed_out", proceed=True)
        else:
            run.finish_step(step, "timed_out")

    def cancel(self, run: "Run", step: StepState, reason: str) -> bool:
        run.clear_timer(keys.wait_timeout(step.key, run.state.redrives))
        return step.status == "waiting"


def _deliver(run: "Run", step: StepState, data: Any) -> None:
    too_big = run.too_big(data)
    if too_big:
        step.error = ErrorInfo(type="ContextTooLarge", message=too_big, retryable=False)
        run.finish_step(step, "failed")
        return
    step.output = data
    run.finish_step(step, "succeeded")
