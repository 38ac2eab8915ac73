"""One decision in progress: the run's frames, steps and end, shared by the step processors.

A ``Run`` changes its own copy of the state, collects the commands for the shell and the domain events for
metrics, and leaves every step-kind decision to the processor of that kind (``legato.workflows.steps``). Its timers
(``run_timers``), state size (``run_size``) and budget (``run_budget``) are parts of their own, and the records a
run's end sends are built in ``run_events``.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

import orjson

from legato.topics.models import ErrorInfo, RunCancelRequested, RunEvent
from legato.workflows import keys, run_limits, transitions
from legato.workflows.commands import Command, EventIgnored, NotifyParent, PublishRunEvent
from legato.workflows.claims import Claims
from legato.workflows.expressions import ExpressionError
from legato.workflows.lifecycle import DEFAULT_RETENTION_S, retention_ms
from legato.workflows.model import CompiledWorkflow, DefaultValue, Fallback, Limit, step_kind
from legato.workflows.run_budget import RunBudget
from legato.workflows.run_events import child_finished, iso, parent_waits, terminal_event
from legato.workflows.run_size import DEFAULT_MAX_STATE_BYTES, RunSize
from legato.workflows.run_timers import RunTimers
from legato.workflows.state import STEP_FINISHED, Frame, RunState, StepState, StepStatus
from legato.workflows.steps import processor
from legato.workflows.steps.base import finish_with_frame
from legato.workflows.transitions import DomainEvent

ACTIVE: tuple[StepStatus, ...] = ("running", "waiting", "waiting_retry")


class Run(RunTimers, RunSize, RunBudget):
    """One decision in progress: mutates its own copy of the state and collects commands and domain events."""

    def __init__(self, state: RunState, wf: CompiledWorkflow | None, now_ms: int, max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
                 default_retention_s: float = DEFAULT_RETENTION_S, limits: Callable[[str], Limit | None] | None = None,
                 claims: Claims | None = None):
        self.state = state
        self._limits = limits  # deployed limits by name (``Catalog.limit``)
        self.claims = claims  # what expressions see of values stored by reference (legato.workflows.claims)
        self.wf = wf
        self.now = now_ms
        self.max_state_bytes = max_state_bytes
        self.default_retention_s = default_retention_s
        self.out: list[Command] = []
        self.events: list[DomainEvent] = []
        self.changed = True
        self._queue: deque[str] = deque()
        self._resuming: set[str] = set()  # frames a redrive resumes: their step at ``index`` runs again

    # --- frames ---------------------------------------------------------------------------------

    def advance(self, frame_id: str) -> None:
        """Queue the frame to start its step at its index (or to finish when none is left).

        A queue, not recursion: loops whose bodies finish without waiting would otherwise nest a call per
        iteration and overflow the stack.
        """
        self._queue.append(frame_id)

    def drain(self) -> None:
        while self._queue:
            self._advance(self._queue.popleft())

    def _advance(self, frame_id: str) -> None:
        frame = self.state.frames.get(frame_id)
        if frame is None or self.state.finished or frame.status != "running":
            return  # cancelled (a failed sibling, a finished run) while it waited in the queue
        steps = self.wf.sequences[frame.ref]
        if frame_id in self._resuming:
            self._resuming.discard(frame_id)
            stopped = self.state.steps.get(keys.step_key(frame.id, steps[frame.index].id)) if frame.index < len(steps) else None
            if stopped is not None:
                self.redrive_step(stopped)
                return
        if frame.index >= len(steps):
            frame.status = "succeeded"
            self.frame_finished(frame)
            return
        if self.state.budget_exhausted:
            return  # on_budget: finish: nothing new starts once over budget; stop_for_budget ends the run
        self.start_step(steps[frame.index], frame)

    def frame_finished(self, frame: Frame) -> None:
        if frame.owner is None:
            self.finish_run(frame.status == "succeeded", frame.last_output, frame.error, confidence=frame.last_confidence)
            return
        owner = self.state.steps[frame.owner]
        if owner.status != "running":
            return
        if frame.id == keys.fallback_frame(owner.key):  # on_error fallback steps of any kind of step
            finish_with_frame(self, owner, frame)
            return
        processor(owner.kind).child_finished(self, owner, self.wf.steps[owner.step_id], frame)

    def child_frame(self, owner: StepState, frame_id: str, ref: str, parent: Frame, name: str | None = None, **scope: Any) -> Frame:
        frame = Frame(id=frame_id, ref=ref, owner=owner.key, scope={**parent.scope, **scope}, name=name)
        self.state.frames[frame_id] = frame
        self.grow(self.STEP_BYTES + (len(orjson.dumps(frame.scope)) if frame.scope else 0))
        owner.children.append(frame_id)
        return frame

    def resume_frame(self, frame: Frame) -> None:
        """A redrive runs ``frame`` (failed, or cancelled when its run failed) again from the step it stopped at (or
        starts that step when it never started)."""
        frame.status, frame.error = "running", None
        self._resuming.add(frame.id)
        self.advance(frame.id)

    def drop_frame(self, frame: Frame) -> None:
        """Forget a finished frame and the steps in it (their results were already taken)."""
        for key in frame.step_keys:
            step = self.state.steps.pop(key, None)
            if step is not None:
                if step.status in ACTIVE:  # nothing will take its result now: its request and timers go too
                    processor(step.kind).cancel(self, step, "its frame ended")
                for child in step.children:
                    nested = self.state.frames.get(child)
                    if nested is not None:
                        self.drop_frame(nested)
        self.state.frames.pop(frame.id, None)
        if frame.owner is not None:
            owner = self.state.steps.get(frame.owner)
            if owner is not None and frame.id in owner.children:
                owner.children.remove(frame.id)

    # --- steps ----------------------------------------------------------------------------------

    def start_step(self, definition: Any, frame: Frame) -> None:
        kind = step_kind(definition)
        step = transitions.begin(self, definition.id, kind, frame, keys.step_key(frame.id, definition.id))
        try:
            processor(kind).start(self, step, definition, frame, self.variables(frame))
        except ExpressionError as exc:
            self._expression_failed(step, exc)

    def redrive_step(self, step: StepState) -> None:
        """A redrive runs ``step`` again (reopened unless the run's end left it running): its fallback steps when it
        ran them (they failed: its own failure was already handled), else what its processor's ``redrive`` runs again:
        itself, or the frames below it that failed or were cancelled."""
        if step.status in STEP_FINISHED:
            transitions.reopen(self, step)
        fallback = self.state.frames.get(keys.fallback_frame(step.key))
        if fallback is not None:
            self.resume_frame(fallback)
            return
        try:
            processor(step.kind).redrive(self, step, self.wf.steps[step.step_id])
        except ExpressionError as exc:  # a sleep's `until`, an input rendered again
            self._expression_failed(step, exc)

    def _expression_failed(self, step: StepState, exc: ExpressionError) -> None:
        step.error = ErrorInfo(type="ExpressionError", message=f"step {step.step_id}: {exc}", retryable=False)
        self.cancel_children(step, "expression error")
        processor(step.kind).cancel(self, step, "expression error")
        self.finish_step(step, "failed")

    def finish_step(self, step: StepState, status: StepStatus, output: Any = None, proceed: bool = False) -> None:
        """Record a final status and move the step's frame on (or fail it, unless ``proceed``)."""
        if output is not None:
            step.output = output
        if step.kind != "activity" and status == "succeeded" and step.output is not None:
            # A compound step's output (a map's list of every result, a loop's last) is held three times, as an
            # activity's is: refused the same way when the state could not hold it (the estimate must see it, or
            # the state that outgrew the limit with it would be stored).
            refused = self.too_big(step.output)
            if refused:
                step.output = None
                self.failed_finally(step, ErrorInfo(type="ContextTooLarge", message=refused, retryable=False), "failed")
                return
        step.request = None  # only a pending request is ever re-sent; keep the state small
        transitions.move(self, step, status)
        frame = self.state.frames.get(step.frame)
        if frame is None or frame.status != "running" or self.state.finished:
            return
        if proceed or status in ("succeeded", "skipped"):
            frame.last_output = step.output
            frame.last_confidence = step.confidence
            frame.index += 1
            self.advance(frame.id)
        else:
            frame.status = "failed"
            frame.error = step.error
            self.frame_finished(frame)

    def failed_finally(self, step: StepState, error: ErrorInfo, final_status: StepStatus) -> None:
        """A step failed for good: apply its ``on_error`` (the same rules for every step kind that has one)."""
        step.error = error
        policy = getattr(self.wf.steps[step.step_id], "on_error", "fail")
        if isinstance(policy, DefaultValue):
            self.finish_step(step, final_status, output=policy.default, proceed=True)
        elif isinstance(policy, Fallback):
            transitions.move(self, step, "running")  # until the fallback steps end
            child = self.child_frame(step, keys.fallback_frame(step.key), keys.sequence_ref(step.step_id, "fallback"), self.state.frames[step.frame])
            self.advance(child.id)
        elif policy == "continue":
            step.output = None
            self.finish_step(step, final_status, proceed=True)
        else:
            self.finish_step(step, final_status)

    def cancel_children(self, step: StepState, reason: str, status: StepStatus = "cancelled") -> None:
        """Cancel every unfinished step below ``step`` (lost races, failed siblings, timeouts)."""
        for frame_id in step.children:
            frame = self.state.frames.get(frame_id)
            if frame is not None and frame.status == "running":
                frame.status = "cancelled"
        prefixes = keys.descendant_prefixes(step.key)
        for other in self.state.steps.values():
            if other.key.startswith(prefixes) and other.status in ACTIVE:
                processor(other.kind).cancel(self, other, reason)
                transitions.move(self, other, status)

    def fallback_running(self, step: StepState) -> bool:
        return keys.fallback_frame(step.key) in step.children

    # --- run ------------------------------------------------------------------------------------

    def finish_run(self, ok: bool, output: Any, error: ErrorInfo | None, explicit_output: bool = False, confidence: float | None = None) -> None:
        """End the run (``confidence``: of its last step, kept if it succeeds)."""
        state = self.state
        if state.finished:
            return
        if ok and self.wf is not None and self.wf.definition.output is not None and not explicit_output:
            try:
                output = self.wf.expr("output").evaluate({"input": state.input, "steps": state.view}, self.claims)
            except ExpressionError as exc:
                if state.budget_exhausted:  # on_budget: finish: the run ends with what it has, not on an error
                    output = self.outputs_so_far()
                else:
                    ok, output = False, None
                    error = ErrorInfo(type="ExpressionError", message=f"workflow output: {exc}", retryable=False)
        state.confidence = confidence if ok else None
        self._end("succeeded" if ok else "failed", output, error or ErrorInfo(type="RunFailed", message="the run failed", retryable=False))

    def cancel_run(self, event: RunCancelRequested) -> None:
        """A RunCancelRequested: stop what the run waits for (its child runs and waits too) and end it cancelled."""
        self.state.cancelled_by = event.requested_by
        who = f"run {event.requested_by}" if event.requested_by else "a user"
        self._end("cancelled", None, ErrorInfo(type="cancelled", message=event.reason or f"cancelled by {who}", retryable=False))

    def _end(self, status: str, output: Any, error: ErrorInfo) -> None:
        state = self.state
        ok = status == "succeeded"
        reason = "the run was cancelled" if status == "cancelled" else "the run finished"
        for step in list(state.steps.values()):
            # a step that waits for something outside the run (a request, a child run, a signal) is cancelled;
            # compound steps stay as they were, their frames are closed below
            if step.status in ACTIVE and processor(step.kind).cancel(self, step, reason):
                transitions.move(self, step, "cancelled")
        run_limits.release(self, state)
        state.requests.clear()
        state.timers.clear()
        # a durable timer like every other, so a finished run is forgotten even across restarts
        self.set_timer_at(keys.run_timer(keys.RUN_RETENTION, state.redrives), self.now + retention_ms(self.wf, self.default_retention_s), "retention")
        for frame in state.frames.values():
            if frame.status == "running":
                frame.status = "cancelled" if not ok or frame.owner is not None else "succeeded"
        state.status = status
        state.output = output if ok else None
        if state.output is not None:
            self.grow(len(orjson.dumps(state.output)))  # a fourth copy of the last output: enforce_size must see it
        state.error = None if ok else error
        state.finished_ms = self.now
        transitions.run_finished(self)
        completion_topic = self.wf.definition.completion_topic if self.wf else None
        self.out.append(PublishRunEvent(event=terminal_event(state), completion_topic=completion_topic))
        if parent_waits(state):
            self.out.append(NotifyParent(finished=child_finished(state)))

    def redrive(self) -> None:
        """Resume the failed run where it stopped (the machine checked it can be, ``redrive_target``): the run is
        running again, its timeout restarts, its retention timer goes; from the root frame down, every step that
        failed, timed out or was cancelled runs again (``redrive_step``); steps that succeeded keep their outputs."""
        state = self.state
        state.status = "running"
        state.finished_ms = state.output = state.error = state.confidence = None
        state.redrives += 1
        state.timers.clear()  # a finished run holds only its retention timer
        self.publish("run.redriven")
        if self.wf.definition.timeout is not None:
            self.set_timer(keys.run_timer(keys.RUN_TIMEOUT, state.redrives), self.wf.definition.timeout, "run_timeout")
        self.resume_frame(state.frames["root"])

    def stop_for_budget(self) -> None:
        """``on_budget: finish``, once over budget: nothing new has started since (``_advance`` holds every frame
        where it is), and a loop whose iteration ended in this decision has made its check. Stop every loop still
        running with its last iteration's output (inner loops first, so their frames move on and the joins and
        loops around them settle), then end the run with what it has; finish_run cancels what is still in flight."""
        state = self.state
        if state.finished or not state.budget_exhausted:
            return
        for step in [s for s in reversed(state.steps.values()) if s.kind == "loop"]:
            if step.status == "running" and not state.finished:
                self.cancel_children(step, "the budget is spent")
                self.clear_timer(keys.loop_timeout(step.key, state.redrives))
                step.ended_by = step.ended_by or "budget"
                self.finish_step(step, "succeeded")
                self.drain()
        self.finish_run(True, self.outputs_so_far(), None)

    def outputs_so_far(self) -> dict[str, Any]:
        """The latest output of every step that ran and was not cancelled, by step id (what CEL sees as
        ``steps.<id>.output``)."""
        return {step_id: entry["output"] for step_id, entry in self.state.view.items() if entry["status"] != "cancelled"}

    def publish(self, kind: str) -> None:
        s = self.state
        self.out.append(
            PublishRunEvent(
                event=RunEvent(type=kind, run_id=s.run_id, workflow=s.workflow, status="running", started_at=iso(s.started_ms),
                               correlation_id=s.correlation_id, version=s.version or None, redrives=s.redrives or None,
                               forked_from=s.forked_from)
            )
        )

    # --- helpers --------------------------------------------------------------------------------

    def variables(self, frame: Frame) -> dict[str, Any]:
        return {"input": self.state.input, "steps": self.state.view, **frame.scope}

    def truth(self, key: str, variables: dict[str, Any]) -> bool:
        value = self.wf.expr(key).evaluate(variables, self.claims)
        if not isinstance(value, bool):
            raise ExpressionError(f"{self.wf.expr(key).source!r} gave {type(value).__name__}, not a bool")
        return value

    def limit(self, name: str) -> Limit | None:
        """The limit ``name``: the workflow's own ``limits:`` first, then the deployed ones."""
        own = self.wf.definition.limits.get(name) if self.wf is not None else None
        if own is not None or self._limits is None:
            return own
        return self._limits(name)

    def ignore(self, reason: str, detail: str) -> None:
        self.changed = False
        self.out.append(EventIgnored(run_id=self.state.run_id, reason=reason, detail=detail))
