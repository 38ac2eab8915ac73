"""The pure state machine: ``decide(state, event, now_ms) -> (state, commands)``.

No Kafka, no clock, no randomness: the shell passes the time in, request and timer ids are derived from the
run_id and the step's place in the run, so replaying the same events yields the same state and commands.
Every decision about joins, branches, loop exits, retries and timeouts is made here.
"""
from __future__ import annotations

from collections import deque
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Union

from pydantic import BaseModel, ConfigDict

import hashlib

import orjson

from legato.topics.models import (
    ActivityCompleted,
    ActivityRequested,
    ChildRunFinished,
    ErrorInfo,
    RequestCancelled,
    RunAccepted,
    RunCancelRequested,
    RunEvent,
    TimerFired,
)
from legato.workflows.expressions import ExpressionError
from legato.workflows.model import (
    DEFAULT_ACTIVITY_TIMEOUT,
    ENGINE_MAX_ITERATIONS,
    MAX_WORKFLOW_DEPTH,
    ActivityStep,
    ChoiceStep,
    CompiledWorkflow,
    DefaultValue,
    EndStep,
    Fallback,
    FailStep,
    LoopStep,
    MapStep,
    NOf,
    ParallelStep,
    WorkflowStep,
    step_kind,
)
from legato.workflows.state import Frame, RunState, StepState, Timer

Event = Union[RunAccepted, ActivityCompleted, TimerFired, ChildRunFinished, RunCancelRequested]

DEFAULT_MAX_STATE_BYTES = 1024 * 1024
"""A run's state may not grow past this; an output that would make it is refused (catchable by on_error)."""

DEFAULT_MAP_CONCURRENCY = 256
"""Item sub-flows a map keeps in flight when it sets no ``max_concurrency``: every one in flight is held in the
run's state, so an unbounded 10,000-item fan-out could not fit the state limit (it measured 8 MB)."""

BRANCH_ATTEMPTS = 3
"""How often a parallel branch with ``on_failure: retry`` runs before its failure fails the step."""


# --- commands (imperative) and refusals (what happened instead) -----------------------------------


class _Command(BaseModel):
    model_config = ConfigDict(frozen=True)


class RequestActivity(_Command):
    request: ActivityRequested


class StartTimer(_Command):
    run_id: str
    timer_id: str
    due_ms: int


class PublishRunEvent(_Command):
    event: RunEvent
    completion_topic: str | None = None


class CancelRequest(_Command):
    """Tell workers to skip or stop a request the run no longer waits for."""

    cancel: RequestCancelled


class StartChildRun(_Command):
    """Start a sub-workflow's run (sent to the coordinator topic, keyed by the child's run_id)."""

    accepted: RunAccepted


class CancelChildRun(_Command):
    """Stop a child run the parent no longer waits for (sent to the coordinator topic, keyed by the child's run_id)."""

    cancel: RunCancelRequested


class NotifyParent(_Command):
    """Tell a parent run that its child finished (sent to the coordinator topic, keyed by the parent's run_id)."""

    finished: ChildRunFinished


class EventIgnored(_Command):
    """A refused transition: duplicate, stale or unknown. Counted by the shell, never silently dropped."""

    run_id: str
    reason: str  # duplicate_trigger | unknown_run | run_finished | duplicate_completion | unknown_request | stale_attempt | stale_timer | stale_child
    detail: str = ""


Command = Union[RequestActivity, StartTimer, PublishRunEvent, CancelRequest, StartChildRun, CancelChildRun, NotifyParent, EventIgnored]


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Machine:
    """Decides runs of the given workflow definitions."""

    def __init__(self, workflows: Mapping[str, CompiledWorkflow], max_state_bytes: int = DEFAULT_MAX_STATE_BYTES):
        self.workflows = dict(workflows)
        self.max_state_bytes = max_state_bytes

    def decide(self, state: RunState | None, event: Event, now_ms: int, *, in_place: bool = False) -> tuple[RunState | None, list[Command]]:
        """Apply ``event`` to a copy of ``state``; return the new state and the commands to carry out.

        ``in_place=True`` skips the copy and changes ``state`` itself: for a caller that owns a state it just
        decoded and discards on error (the coordinator), since a deep copy costs more than the decision.
        """
        if isinstance(event, RunAccepted):
            if state is not None:
                return state, [EventIgnored(run_id=event.run_id, reason="duplicate_trigger")]
            return self._start(event, now_ms)
        if state is None:
            return None, [EventIgnored(run_id=event.run_id, reason="unknown_run", detail=_describe(event))]
        if state.finished:
            return state, [EventIgnored(run_id=state.run_id, reason="run_finished", detail=_describe(event))]
        wf = self.workflows.get(state.workflow)
        if isinstance(event, RunCancelRequested):
            run = _Run(state if in_place else state.model_copy(deep=True), wf, now_ms, self.max_state_bytes)
            run.cancel_run(event)
            return run.state, run.out
        if wf is None:  # the definition was removed while the run was in flight
            run = _Run(state if in_place else state.model_copy(deep=True), None, now_ms, self.max_state_bytes)
            run.finish_run(False, None, ErrorInfo(type="UnknownWorkflow", message=f"workflow {state.workflow!r} is no longer loaded", retryable=False))
            return run.state, run.out
        run = _Run(state if in_place else state.model_copy(deep=True), wf, now_ms, self.max_state_bytes)
        if isinstance(event, ActivityCompleted):
            run.on_completion(event)
        elif isinstance(event, ChildRunFinished):
            run.on_child_finished(event)
        else:
            run.on_timer(event)
        run.drain()
        run.stop_for_budget()
        run.enforce_size()
        if not run.changed:
            return state, run.out
        return run.state, run.out

    def _start(self, event: RunAccepted, now_ms: int) -> tuple[RunState, list[Command]]:
        wf = self.workflows.get(event.workflow)
        state = RunState(
            run_id=event.run_id,
            workflow=event.workflow,
            version=wf.version if wf else 0,
            input=event.input,
            correlation_id=event.correlation_id,
            parent=event.parent,
            started_ms=now_ms,
            depth=int((event.parent or {}).get("depth", 0)),
        )
        run = _Run(state, wf, now_ms, self.max_state_bytes)
        if wf is None:
            known = ", ".join(sorted(self.workflows)) or "none"
            run.finish_run(False, None, ErrorInfo(type="UnknownWorkflow", message=f"no workflow named {event.workflow!r} (loaded: {known})", retryable=False))
            return run.state, run.out
        if state.depth > MAX_WORKFLOW_DEPTH:
            run.finish_run(False, None, ErrorInfo(type="DepthExceeded", message=f"sub-workflows nest deeper than {MAX_WORKFLOW_DEPTH}", retryable=False))
            return run.state, run.out
        run.publish("run.started")
        if wf.definition.timeout is not None:
            run.set_timer("run:timeout", wf.definition.timeout, "run_timeout")
        run.state.frames["root"] = Frame(id="root", ref="root")
        run.advance("root")
        run.drain()
        run.enforce_size()
        return run.state, run.out


def outstanding(state: RunState, completion_topic: str | None = None) -> list[Command]:
    """Commands that a replayed event must re-issue after a crash: pending requests and child runs, timers,
    the cancellation of child runs the run stopped waiting for, and a finished run's terminal event (and its
    parent's notice).

    Re-issuing is safe: request and child run ids are deterministic, so workers and the coordinator drop duplicates;
    a child run that already ended ignores its cancellation.
    """
    out: list[Command] = []
    for key in state.requests.values():
        step = state.steps[key]
        if step.request is not None:
            out.append(RequestActivity(request=ActivityRequested.model_validate(step.request)))
    for step in state.steps.values():
        if step.kind == "workflow" and step.status == "running" and step.request is not None:
            out.append(StartChildRun(accepted=RunAccepted.model_validate(step.request)))
        elif _abandoned_child(step):
            out.append(CancelChildRun(cancel=RunCancelRequested(run_id=step.child_run, reason="the parent no longer waits for it", requested_by=state.run_id)))
    for timer_id, timer in state.timers.items():
        out.append(StartTimer(run_id=state.run_id, timer_id=timer_id, due_ms=timer.due_ms))
    if state.finished:
        out.append(PublishRunEvent(event=_terminal_event(state), completion_topic=completion_topic))
        if _parent_waits(state):
            out.append(NotifyParent(finished=_child_finished(state)))
    return out


def _abandoned_child(step: StepState) -> bool:
    """Whether a sub-workflow step stopped waiting for its child run (a lost race, a timeout, a finished run)."""
    timed_out = step.error is not None and step.error.type == "ChildRunTimeout"
    return step.kind == "workflow" and step.child_run is not None and (step.status in ("cancelled", "timed_out") or timed_out)


def _parent_waits(state: RunState) -> bool:
    """A finished child run tells its parent, unless the parent cancelled it (the parent has moved on)."""
    return bool(state.parent) and not (state.status == "cancelled" and state.cancelled_by == state.parent.get("run_id"))


def _child_finished(state: RunState) -> ChildRunFinished:
    parent = state.parent or {}
    return ChildRunFinished(
        run_id=parent["run_id"],
        step_key=parent["step_key"],
        child_run_id=state.run_id,
        status="succeeded" if state.status == "succeeded" else "failed",
        output=state.output,
        error=state.error,
        cost=dict(state.cost) or None,
    )


def _jitter(seed: str) -> float:
    """A factor in [0.8, 1.2) derived from ``seed``: retries of many runs spread out, replays stay identical."""
    digest = hashlib.blake2b(seed.encode(), digest_size=4).digest()
    return 0.8 + 0.4 * int.from_bytes(digest, "big") / 2**32


def _describe(event: Event) -> str:
    if isinstance(event, ActivityCompleted):
        return f"request {event.request_id} attempt {event.attempt}"
    if isinstance(event, TimerFired):
        return f"timer {event.timer_id}"
    if isinstance(event, ChildRunFinished):
        return f"child run {event.child_run_id}"
    if isinstance(event, RunCancelRequested):
        return f"cancellation requested by {event.requested_by or 'a user'}: {event.reason}"
    return ""


def _terminal_event(state: RunState) -> RunEvent:
    ok = state.status == "succeeded"
    status = state.status if state.status in ("succeeded", "cancelled") else "failed"
    finished = state.finished_ms or state.started_ms
    return RunEvent(
        type={"succeeded": "run.completed", "cancelled": "run.cancelled"}.get(status, "run.failed"),
        run_id=state.run_id,
        workflow=state.workflow,
        status=status,
        output=state.output if ok else None,
        error=None if ok else state.error,
        started_at=iso(state.started_ms),
        finished_at=iso(finished),
        duration_ms=finished - state.started_ms,
        correlation_id=state.correlation_id,
        path=list(state.path),
        cost=dict(state.cost) or None,
        stopped_by="budget" if ok and state.budget_exhausted else None,
    )


class _Run:
    """One decision in progress: mutates its own copy of the state and collects commands."""

    def __init__(self, state: RunState, wf: CompiledWorkflow | None, now_ms: int, max_state_bytes: int = DEFAULT_MAX_STATE_BYTES):
        self.state = state
        self.wf = wf
        self.now = now_ms
        self.max_state_bytes = max_state_bytes
        self.out: list[Command] = []
        self.changed = True
        self._queue: deque[str] = deque()

    # --- events ---------------------------------------------------------------------------------

    def on_completion(self, event: ActivityCompleted) -> None:
        key = self.state.requests.get(event.request_id)
        if key is None:
            earlier = self._step_of_request(event.request_id)
            if earlier is not None and earlier.request_id == event.request_id:
                self._ignore("duplicate_completion", f"request {event.request_id} already completed ({earlier.status})")
            elif earlier is not None:
                self._ignore("stale_attempt", f"request {event.request_id} is no longer pending (step {earlier.key} at attempt {earlier.attempt}, {earlier.status})")
            elif self._made_here(event.request_id):
                self._ignore("stale_attempt", f"request {event.request_id} belongs to a finished loop iteration or map item, or a branch that ran again")
            else:
                self._ignore("unknown_request", f"request {event.request_id} was never made by this run")
            return
        step = self.state.steps[key]
        if event.attempt != step.attempt or step.status != "running":
            self._ignore("stale_attempt", f"request {event.request_id} attempt {event.attempt}, step at {step.attempt} ({step.status})")
            return
        self._clear_pending(step)
        if event.cost is not None:
            self._add_cost(step, event.cost.model_dump(exclude_none=True))
        step.confidence = event.confidence
        step.cached = bool(event.cached)
        if event.status == "succeeded":
            too_big = self._too_big(event.output)
            if too_big:
                self.attempt_failed(step, ErrorInfo(type="ContextTooLarge", message=too_big, retryable=False), "failed")
            else:
                step.output = event.output
                self.finish_step(step, "succeeded")
        else:
            error = event.error or ErrorInfo(type="ActivityFailed", message="the worker reported a failure without an error")
            self.attempt_failed(step, error, "failed")
        self._check_budget()

    def on_child_finished(self, event: ChildRunFinished) -> None:
        step = self.state.steps.get(event.step_key)
        fallback_running = step is not None and f"{step.key}/fallback" in step.children
        if step is None or step.child_run != event.child_run_id or step.status != "running" or fallback_running:
            self._ignore("stale_child", f"child run {event.child_run_id} of step {event.step_key}")
            return
        self._clear_timer(f"{step.key}:timeout:1")
        if event.cost:
            self._add_cost(step, {k: v for k, v in event.cost.items() if k != "models"}, models=event.cost.get("models"))
        too_big = self._too_big(event.output) if event.status == "succeeded" else None
        if too_big:
            self._failed_finally(step, ErrorInfo(type="ContextTooLarge", message=too_big, retryable=False), "failed")
        elif event.status == "succeeded":
            step.output = event.output
            self.finish_step(step, "succeeded")
        else:
            error = event.error or ErrorInfo(type="ChildRunFailed", message=f"child run {event.child_run_id} failed")
            self._failed_finally(step, ErrorInfo(type=error.type, message=error.message, retryable=False), "failed")
        self._check_budget()

    def on_timer(self, event: TimerFired) -> None:
        timer = self.state.timers.pop(event.timer_id, None)
        if timer is None:
            self._ignore("stale_timer", f"timer {event.timer_id} is not pending")
            return
        if timer.kind == "run_timeout":
            self.finish_run(False, None, ErrorInfo(type="RunTimeout", message="the run exceeded its timeout", retryable=False))
            return
        step = self.state.steps.get(timer.target or "")
        if step is None:
            return
        if timer.kind == "activity_timeout" and step.status == "running" and step.attempt == timer.attempt:
            self._clear_pending(step)
            if step.kind == "workflow":
                self._cancel_child_run(step, "the step timed out")
                self._failed_finally(step, ErrorInfo(type="ChildRunTimeout", message=f"child run {step.child_run} took longer than the step's timeout", retryable=False), "timed_out")
            else:
                self.attempt_failed(step, ErrorInfo(type="ActivityTimeout", message=f"attempt {step.attempt} took longer than its timeout", retryable=True), "timed_out")
        elif timer.kind == "retry" and step.status == "waiting_retry":
            self._request(step, self.wf.steps[step.step_id], step.attempt + 1)
        elif timer.kind == "loop_timeout" and step.status == "running":
            self._cancel_children(step, "loop timeout")
            self._loop_exhausted(step, "timeout", step.output)
        elif timer.kind == "join_timeout" and step.status == "running":
            self._join_timed_out(step)

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
        if frame.index >= len(steps):
            frame.status = "succeeded"
            self._frame_finished(frame)
            return
        if self.state.budget_exhausted:
            return  # on_budget: finish: nothing new starts once over budget; stop_for_budget ends the run
        self._start_step(steps[frame.index], frame)

    def _frame_finished(self, frame: Frame) -> None:
        if frame.owner is None:
            self.finish_run(frame.status == "succeeded", frame.last_output, frame.error)
            return
        owner = self.state.steps[frame.owner]
        if owner.status != "running":
            return
        definition = self.wf.steps[owner.step_id]
        if isinstance(definition, (ParallelStep, MapStep)):
            self._fanout_child_finished(owner, definition, frame)
        elif isinstance(definition, LoopStep) and frame.ref.endswith("/exhausted"):
            owner.output, owner.error = frame.last_output, frame.error
            self.finish_step(owner, "succeeded" if frame.status == "succeeded" else "failed")
        elif isinstance(definition, LoopStep):
            self._loop_iteration_finished(owner, definition, frame)
        else:  # a choice's path or an activity's fallback
            owner.output = frame.last_output
            if frame.status == "succeeded":
                self.finish_step(owner, "succeeded")
            else:
                owner.error = frame.error
                self.finish_step(owner, "failed")

    def _child_frame(self, owner: StepState, frame_id: str, ref: str, parent: Frame, name: str | None = None, **scope: Any) -> Frame:
        frame = Frame(id=frame_id, ref=ref, owner=owner.key, scope={**parent.scope, **scope}, name=name)
        self.state.frames[frame_id] = frame
        owner.children.append(frame_id)
        return frame

    # --- steps ----------------------------------------------------------------------------------

    def _start_step(self, definition: Any, frame: Frame) -> None:
        key = definition.id if frame.id == "root" else f"{frame.id}/{definition.id}"
        step = StepState(key=key, step_id=definition.id, kind=step_kind(definition), frame=frame.id, started_ms=self.now)
        if "iteration" in frame.scope:
            step.iteration = frame.scope["iteration"]
        self.state.steps[key] = step
        frame.step_keys.append(key)
        variables = self._variables(frame)
        try:
            if isinstance(definition, ActivityStep):
                self._request(step, definition, 1, variables)
            elif isinstance(definition, WorkflowStep):
                self._start_child_run(step, definition, variables)
            elif isinstance(definition, ParallelStep):
                spec = definition.parallel
                step.total = len(spec.branches)
                frames = [self._child_frame(step, f"{key}/{name}", f"{definition.id}/{name}", frame, name=name) for name in spec.branches]
                self._arm_join_timeout(step, spec)
                for child in frames:  # all frames exist before any starts, so no join fires early
                    self.advance(child.id)
            elif isinstance(definition, MapStep):
                self._start_map(step, definition, frame, variables)
            elif isinstance(definition, ChoiceStep):
                path = self._choose(definition, variables)
                step.path = path
                self.state.path.append(f"{definition.id}:{path}")
                child = self._child_frame(step, f"{key}/{path}", f"{definition.id}/{path}", frame)
                self.advance(child.id)
            elif isinstance(definition, LoopStep):
                self._start_loop(step, definition, frame, variables)
            elif isinstance(definition, EndStep):
                spec = definition.end
                if spec.when is None or self._truth(f"{definition.id}.when", variables):
                    output = self.wf.expr(f"{definition.id}.output").evaluate(variables) if spec.output else frame.last_output
                    step.output = output
                    step.status, step.finished_ms = "succeeded", self.now
                    self._update_view(step)
                    self.finish_run(True, output, None, explicit_output=True)
                else:
                    self.finish_step(step, "skipped", output=frame.last_output)
            elif isinstance(definition, FailStep):
                spec = definition.fail
                if spec.when is None or self._truth(f"{definition.id}.when", variables):
                    reason = self.wf.expr(f"{definition.id}.reason").evaluate(variables)
                    step.error = ErrorInfo(type="WorkflowFailed", message=str(reason), retryable=False)
                    self.finish_step(step, "failed")
                else:
                    self.finish_step(step, "skipped", output=frame.last_output)
        except ExpressionError as exc:
            step.error = ErrorInfo(type="ExpressionError", message=f"step {definition.id}: {exc}", retryable=False)
            self._cancel_children(step, "expression error")
            self._clear_pending(step)
            self.finish_step(step, "failed")

    def finish_step(self, step: StepState, status: str, output: Any = None, proceed: bool = False) -> None:
        """Record a terminal status and move the step's frame on (or fail it, unless ``proceed``)."""
        if output is not None:
            step.output = output
        step.status = status
        step.finished_ms = self.now
        step.request = None  # only a pending request is ever re-sent; keep the state small
        self._update_view(step)
        frame = self.state.frames.get(step.frame)
        if frame is None or frame.status != "running" or self.state.finished:
            return
        if proceed or status in ("succeeded", "skipped"):
            frame.last_output = step.output
            frame.index += 1
            self.advance(frame.id)
        else:
            frame.status = "failed"
            frame.error = step.error
            self._frame_finished(frame)

    def attempt_failed(self, step: StepState, error: ErrorInfo, final_status: str) -> None:
        definition = self.wf.steps[step.step_id]
        step.error = error
        retryable = error.retryable and error.type not in definition.non_retryable
        if retryable and step.attempt < definition.retry.max_attempts:
            step.status = "waiting_retry"
            delay = definition.retry.delay(step.attempt)
            if definition.retry.jitter:
                delay = min(delay * _jitter(f"{self.state.run_id}/{step.key}/{step.attempt}"), definition.retry.max_backoff)
            self.set_timer(f"{step.key}:retry:{step.attempt}", delay, "retry", target=step.key, attempt=step.attempt)
            return
        self._failed_finally(step, error, final_status)

    def _failed_finally(self, step: StepState, error: ErrorInfo, final_status: str) -> None:
        """An activity or sub-workflow step failed for good: apply its ``on_error``."""
        step.error = error
        policy = self.wf.steps[step.step_id].on_error
        if isinstance(policy, DefaultValue):
            self.finish_step(step, final_status, output=policy.default, proceed=True)
        elif isinstance(policy, Fallback):
            step.status = "running"  # until the fallback steps end
            frame = self.state.frames[step.frame]
            child = self._child_frame(step, f"{step.key}/fallback", f"{step.step_id}/fallback", frame)
            self.advance(child.id)
        elif policy == "continue":
            step.output = None
            self.finish_step(step, final_status, proceed=True)
        else:
            self.finish_step(step, final_status)

    def _request(self, step: StepState, definition: ActivityStep, attempt: int, variables: dict[str, Any] | None = None) -> None:
        if variables is None:
            variables = self._variables(self.state.frames[step.frame])
        if attempt == 1 or step.request is None:
            payload = self.wf.templates[definition.id].render(variables)
            if payload is None:
                payload = {}
        else:
            payload = step.request["input"]
        timeout = definition.timeout if definition.timeout is not None else DEFAULT_ACTIVITY_TIMEOUT
        request = ActivityRequested(
            request_id=f"{self.state.run_id}/{step.key}/{attempt}",
            run_id=self.state.run_id,
            step_id=definition.id,
            activity=definition.activity,
            attempt=attempt,
            input=payload,
            deadline=self.now + round(timeout * 1000),
            workflow=self.state.workflow,
            requested_ms=self.now,
            cache_ttl_ms=round(definition.cache.ttl * 1000) if definition.cache else None,
            batch={"max_size": definition.batch.max_size, "max_wait_ms": round(definition.batch.max_wait * 1000)} if definition.batch else None,
            rate_limit=definition.rate_limit.per_second if definition.rate_limit else None,
        )
        step.status = "running"
        step.attempt = attempt
        step.request_id = request.request_id
        step.request = request.model_dump(mode="json", exclude_none=True)
        self.state.requests[request.request_id] = step.key
        self.out.append(RequestActivity(request=request))
        self.set_timer(f"{step.key}:timeout:{attempt}", timeout, "activity_timeout", target=step.key, attempt=attempt)

    # --- sub-workflows --------------------------------------------------------------------------

    def _start_child_run(self, step: StepState, definition: WorkflowStep, variables: dict[str, Any]) -> None:
        payload = self.wf.templates[definition.id].render(variables)
        if not isinstance(payload, dict):
            payload = {"value": payload} if payload is not None else {}
        child_id = f"{self.state.run_id}/{step.key}"
        accepted = RunAccepted(
            run_id=child_id,
            workflow=definition.workflow,
            input=payload,
            correlation_id=self.state.correlation_id,
            parent={"run_id": self.state.run_id, "step_key": step.key, "depth": self.state.depth + 1},
        )
        step.status, step.attempt, step.child_run = "running", 1, child_id
        step.request = accepted.model_dump(mode="json", exclude_none=True)
        self.out.append(StartChildRun(accepted=accepted))
        if definition.timeout is not None:
            self.set_timer(f"{step.key}:timeout:1", definition.timeout, "activity_timeout", target=step.key, attempt=1)

    # --- parallel and map -----------------------------------------------------------------------

    def _arm_join_timeout(self, step: StepState, spec: Any) -> None:
        if spec.timeout is not None:
            self.set_timer(f"{step.key}:join_timeout", spec.timeout, "join_timeout", target=step.key)

    def _start_map(self, step: StepState, definition: MapStep, frame: Frame, variables: dict[str, Any]) -> None:
        items = self.wf.expr(f"{definition.id}.items").evaluate(variables)
        if not isinstance(items, list):
            raise ExpressionError(f"map items {definition.map.items!r} gave {type(items).__name__}, not a list")
        step.items, step.total = items, len(items)
        if not items:
            self.finish_step(step, "succeeded", output=[])
            return
        self._arm_join_timeout(step, definition.map)
        limit = definition.map.max_concurrency or DEFAULT_MAP_CONCURRENCY
        for _ in range(min(limit, len(items))):
            self._start_item(step, definition, frame)

    def _start_item(self, step: StepState, definition: MapStep, parent: Frame) -> None:
        index = step.next_index
        step.next_index += 1
        child = self._child_frame(step, f"{step.key}[{index}]", f"{definition.id}/item", parent, name=str(index), item=step.items[index], index=index)
        self.advance(child.id)

    def _fanout_child_finished(self, step: StepState, definition: Any, frame: Frame) -> None:
        is_map = isinstance(definition, MapStep)
        spec = definition.map if is_map else definition.parallel
        name = frame.name or ""
        if frame.status == "succeeded":
            step.results[name] = frame.last_output
            step.succeeded_n += 1
        else:
            policy = spec.failure_policy if is_map else spec.branch_policy(name)
            if policy == "retry" and frame.attempt < BRANCH_ATTEMPTS:
                # run the branch (or the map item) again from its first step, with the same scope
                base = f"{step.key}[{name}]" if is_map else f"{step.key}/{name}"
                scope = {k: frame.scope[k] for k in ("item", "index") if k in frame.scope}
                self._drop_frame(frame)
                retry = self._child_frame(step, f"{base}~{frame.attempt + 1}", frame.ref, self.state.frames[step.frame], name=name, **scope)
                retry.attempt = frame.attempt + 1
                self.advance(retry.id)
                return
            if isinstance(policy, DefaultValue):
                step.results[name] = policy.default
                step.succeeded_n += 1
            elif policy == "continue":
                step.failed_n += 1
                step.error = frame.error
            else:  # fail_fast, or retry exhausted
                step.error = frame.error
                self._cancel_children(step, "a branch failed")
                self._clear_timer(f"{step.key}:join_timeout")
                self.finish_step(step, "failed")
                return
        step.done_n += 1
        if is_map:
            self._drop_frame(frame)  # keep the state small: the result is in step.results
        verdict = self._join_verdict(step, spec.join, frame.status == "succeeded" or name in step.results)
        if verdict is None:
            if is_map and step.next_index < step.total:
                self._start_item(step, definition, self.state.frames[step.frame])
            return
        self._clear_timer(f"{step.key}:join_timeout")
        self._cancel_children(step, "the join is complete")
        if verdict:
            step.output = self._fanout_output(step, is_map)
            self.finish_step(step, "succeeded")
        else:
            step.error = step.error or ErrorInfo(type="JoinFailed", message=f"{step.step_id}: too few branches succeeded for join {_join_name(spec.join)}", retryable=False)
            self.finish_step(step, "failed")

    def _join_verdict(self, step: StepState, join: Any, last_ok: bool) -> bool | None:
        """True: the join is satisfied; False: it can no longer be; None: wait for more branches."""
        remaining = step.total - step.done_n
        if join == "all":
            return None if remaining else True
        if join == "any":
            return last_ok
        if join == "first_success":
            return True if step.succeeded_n else (None if remaining else False)
        need = join.n_of if isinstance(join, NOf) else step.total
        if step.succeeded_n >= need:
            return True
        return False if step.succeeded_n + remaining < need else None

    def _join_timed_out(self, step: StepState) -> None:
        definition = self.wf.steps[step.step_id]
        spec = definition.map if isinstance(definition, MapStep) else definition.parallel
        self._cancel_children(step, "join timeout", status="timed_out")
        if spec.on_timeout == "proceed":
            step.output = self._fanout_output(step, isinstance(definition, MapStep))
            self.finish_step(step, "succeeded")
        else:
            step.error = ErrorInfo(type="JoinTimeout", message=f"{step.step_id}: {step.done_n} of {step.total} branches finished within the timeout", retryable=False)
            self.finish_step(step, "timed_out")

    def _fanout_output(self, step: StepState, is_map: bool) -> Any:
        if is_map:
            return [step.results.get(str(i)) for i in range(step.total)]
        definition = self.wf.steps[step.step_id]
        return {name: step.results[name] for name in definition.parallel.branches if name in step.results}

    # --- choice ---------------------------------------------------------------------------------

    def _choose(self, definition: ChoiceStep, variables: dict[str, Any]) -> str:
        spec = definition.choice
        if spec.route:
            name = self.wf.expr(f"{definition.id}.route").evaluate(variables)
            return f"route:{name}" if isinstance(name, str) and name in spec.routes else "default"
        for i in range(len(spec.cases)):
            if self._truth(f"{definition.id}.when.{i}", variables):
                return f"case{i}"
        return "default"

    # --- loop -----------------------------------------------------------------------------------

    def _start_loop(self, step: StepState, definition: LoopStep, frame: Frame, variables: dict[str, Any]) -> None:
        spec = definition.loop
        scope: dict[str, Any] = {"iteration": 0, "previous": None}
        if spec.for_each is not None:
            items = self.wf.expr(f"{definition.id}.for_each").evaluate(variables)
            if not isinstance(items, list):
                raise ExpressionError(f"for_each {spec.for_each!r} gave {type(items).__name__}, not a list")
            step.items = items
            step.total = -(-len(items) // spec.batch_size)
            if step.total == 0:
                step.ended_by = "items"
                self.finish_step(step, "succeeded", output=None)
                return
            scope.update(item=items[: spec.batch_size], index=0)
        step.iteration = 0
        if spec.timeout is not None:
            self.set_timer(f"{step.key}:loop_timeout", spec.timeout, "loop_timeout", target=step.key)
        child = self._child_frame(step, f"{step.key}#0", f"{definition.id}/body", frame, **scope)
        self.advance(child.id)

    def _loop_iteration_finished(self, step: StepState, definition: LoopStep, frame: Frame) -> None:
        spec = definition.loop
        if frame.status != "succeeded":
            step.error = frame.error
            step.ended_by = "failed"
            self._clear_timer(f"{step.key}:loop_timeout")
            self.finish_step(step, "failed")
            return
        previous = frame.scope.get("previous")
        step.output = frame.last_output
        iteration = step.iteration or 0
        if spec.until is not None:
            variables = {**self._variables(frame), "iteration": iteration}
            try:
                done = self._truth(f"{definition.id}.until", variables)
            except ExpressionError as exc:
                step.error = ErrorInfo(type="ExpressionError", message=f"step {definition.id}: {exc}", retryable=False)
                step.ended_by = "failed"
                self._clear_timer(f"{step.key}:loop_timeout")
                self.finish_step(step, "failed")
                return
            if done:
                self._clear_timer(f"{step.key}:loop_timeout")
                step.ended_by = "until"
                self.finish_step(step, "succeeded")
                return
        step.unchanged = step.unchanged + 1 if iteration > 0 and frame.last_output == previous else 0
        if spec.no_progress is not None and step.unchanged >= spec.no_progress:
            self._loop_exhausted(step, "no_progress", step.output)
            return
        if self.state.budget_exhausted:
            self._loop_exhausted(step, "budget", step.output)
            return
        if spec.for_each is not None and iteration + 1 >= step.total:
            self._clear_timer(f"{step.key}:loop_timeout")
            step.ended_by = "items"
            self.finish_step(step, "succeeded")
            return
        if iteration + 1 >= min(spec.bound if spec.for_each is None or spec.max_iterations else ENGINE_MAX_ITERATIONS, ENGINE_MAX_ITERATIONS):
            self._loop_exhausted(step, "max_iterations", step.output)
            return
        step.iteration = iteration + 1
        parent = self.state.frames[step.frame]
        scope: dict[str, Any] = {"iteration": iteration + 1, "previous": frame.last_output}
        if spec.for_each is not None:
            start = (iteration + 1) * spec.batch_size
            scope.update(item=(step.items or [])[start : start + spec.batch_size], index=iteration + 1)
        self._drop_frame(frame)  # the iteration's results live on in step.output and `previous`
        child = self._child_frame(step, f"{step.key}#{iteration + 1}", f"{definition.id}/body", parent, **scope)
        self.advance(child.id)

    def _loop_exhausted(self, step: StepState, bound: str, output: Any) -> None:
        definition = self.wf.steps[step.step_id]
        spec = definition.loop
        self._clear_timer(f"{step.key}:loop_timeout")
        step.ended_by = bound
        if bound == "budget" or (spec.until is None and spec.for_each is None and bound == "max_iterations" and spec.no_progress is None):
            self.finish_step(step, "succeeded", output=output)  # a counted loop ran to its end; a budget stop keeps what it has
        elif spec.on_exhausted == "continue":
            self.finish_step(step, "succeeded", output=output)
        elif isinstance(spec.on_exhausted, list):
            parent = self.state.frames[step.frame]
            child = self._child_frame(step, f"{step.key}/exhausted", f"{step.step_id}/exhausted", parent, previous=output)
            self.advance(child.id)
        else:
            step.error = ErrorInfo(
                type="LoopExhausted",
                message=f"loop {step.step_id} reached {bound} after {(step.iteration or 0) + 1} iterations without meeting `until`",
                retryable=False,
            )
            self.finish_step(step, "failed")

    # --- run ------------------------------------------------------------------------------------

    def finish_run(self, ok: bool, output: Any, error: ErrorInfo | None, explicit_output: bool = False) -> None:
        state = self.state
        if state.finished:
            return
        if ok and self.wf is not None and self.wf.definition.output is not None and not explicit_output:
            try:
                output = self.wf.expr("output").evaluate({"input": state.input, "steps": state.view})
            except ExpressionError as exc:
                if state.budget_exhausted:  # on_budget: finish: the run ends with what it has, not on an error
                    output = self._outputs_so_far()
                else:
                    ok, output = False, None
                    error = ErrorInfo(type="ExpressionError", message=f"workflow output: {exc}", retryable=False)
        self._end("succeeded" if ok else "failed", output, error or ErrorInfo(type="RunFailed", message="the run failed", retryable=False))

    def cancel_run(self, event: RunCancelRequested) -> None:
        """A RunCancelRequested: stop what the run waits for (its child runs too) and end it cancelled."""
        self.state.cancelled_by = event.requested_by
        who = f"run {event.requested_by}" if event.requested_by else "a user"
        self._end("cancelled", None, ErrorInfo(type="cancelled", message=event.reason or f"cancelled by {who}", retryable=False))

    def _end(self, status: str, output: Any, error: ErrorInfo) -> None:
        state = self.state
        ok = status == "succeeded"
        reason = "the run was cancelled" if status == "cancelled" else "the run finished"
        for key in list(state.requests.values()):
            step = state.steps[key]
            self._cancel_request(step, reason)
            step.status, step.finished_ms = "cancelled", self.now
        state.requests.clear()
        for step in state.steps.values():
            if self._child_running(step):
                self._cancel_child_run(step, reason)
                step.status, step.finished_ms = "cancelled", self.now
        state.timers.clear()
        for frame in state.frames.values():
            if frame.status == "running":
                frame.status = "cancelled" if not ok or frame.owner is not None else "succeeded"
        state.status = status
        state.output = output if ok else None
        state.error = None if ok else error
        state.finished_ms = self.now
        completion_topic = self.wf.definition.completion_topic if self.wf else None
        self.out.append(PublishRunEvent(event=_terminal_event(state), completion_topic=completion_topic))
        if _parent_waits(state):
            self.out.append(NotifyParent(finished=_child_finished(state)))

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
                self._cancel_children(step, "the budget is spent")
                self._clear_timer(f"{step.key}:loop_timeout")
                step.ended_by = step.ended_by or "budget"
                self.finish_step(step, "succeeded")
                self.drain()
        self.finish_run(True, self._outputs_so_far(), None)

    def _outputs_so_far(self) -> dict[str, Any]:
        """The latest output of every step that ran and was not cancelled, by step id (what CEL sees as
        ``steps.<id>.output``)."""
        return {step_id: entry["output"] for step_id, entry in self.state.view.items() if entry["status"] != "cancelled"}

    def publish(self, kind: str) -> None:
        s = self.state
        self.out.append(
            PublishRunEvent(
                event=RunEvent(type=kind, run_id=s.run_id, workflow=s.workflow, status="running", started_at=iso(s.started_ms), correlation_id=s.correlation_id)
            )
        )

    def _check_budget(self) -> None:
        budget = self.wf.definition.budget if self.wf else None
        if budget is None or self.state.finished or self.state.budget_exhausted:
            return
        cost = self.state.cost
        tokens = cost.get("tokens_in", 0) + cost.get("tokens_out", 0)
        over = (budget.usd is not None and cost.get("usd", 0) > budget.usd) or (budget.tokens is not None and tokens > budget.tokens)
        if not over:
            return
        self.state.budget_exhausted = True
        if self.wf.definition.on_budget == "fail":
            self.finish_run(False, None, ErrorInfo(type="budget_exceeded", message=f"spent usd {cost.get('usd', 0)} and {tokens} tokens; budget {budget.model_dump(exclude_none=True)}", retryable=False))

    # --- helpers --------------------------------------------------------------------------------

    def set_timer(self, timer_id: str, seconds: float, kind: str, target: str | None = None, attempt: int | None = None) -> None:
        due = self.now + round(seconds * 1000)
        self.state.timers[timer_id] = Timer(due_ms=due, kind=kind, target=target, attempt=attempt)
        self.out.append(StartTimer(run_id=self.state.run_id, timer_id=timer_id, due_ms=due))

    def _clear_timer(self, timer_id: str) -> None:
        self.state.timers.pop(timer_id, None)

    def _clear_pending(self, step: StepState) -> None:
        if step.request_id:
            self.state.requests.pop(step.request_id, None)
        self._clear_timer(f"{step.key}:timeout:{step.attempt}")
        self._clear_timer(f"{step.key}:retry:{step.attempt}")

    def _cancel_request(self, step: StepState, reason: str) -> None:
        if step.kind == "activity" and step.request_id and step.request_id in self.state.requests:
            activity = self.wf.steps[step.step_id].activity if self.wf else ""
            self.out.append(CancelRequest(cancel=RequestCancelled(request_id=step.request_id, run_id=self.state.run_id, activity=activity, reason=reason)))

    def _child_running(self, step: StepState) -> bool:
        """Whether a sub-workflow step still waits for its child run (not for its fallback steps)."""
        return step.kind == "workflow" and step.status == "running" and step.child_run is not None and f"{step.key}/fallback" not in step.children

    def _cancel_child_run(self, step: StepState, reason: str) -> None:
        if self._child_running(step):
            self.out.append(CancelChildRun(cancel=RunCancelRequested(run_id=step.child_run, reason=reason, requested_by=self.state.run_id)))

    def _cancel_children(self, step: StepState, reason: str, status: str = "cancelled") -> None:
        """Cancel every unfinished step below ``step`` (lost races, failed siblings, timeouts)."""
        for frame_id in step.children:
            frame = self.state.frames.get(frame_id)
            if frame is not None and frame.status == "running":
                frame.status = "cancelled"
        prefixes = (step.key + "/", step.key + "#", step.key + "[")
        for other in self.state.steps.values():
            if other.key.startswith(prefixes) and other.status in ("running", "waiting_retry"):
                self._cancel_request(other, reason)
                self._cancel_child_run(other, reason)
                self._clear_pending(other)
                self._clear_timer(f"{other.key}:loop_timeout")
                self._clear_timer(f"{other.key}:join_timeout")
                other.status, other.finished_ms = status, self.now
                self._update_view(other)

    def _drop_frame(self, frame: Frame) -> None:
        """Forget a finished frame and the steps in it (their results were already taken)."""
        for key in frame.step_keys:
            step = self.state.steps.pop(key, None)
            if step is not None:
                for child in step.children:
                    nested = self.state.frames.get(child)
                    if nested is not None:
                        self._drop_frame(nested)
        self.state.frames.pop(frame.id, None)
        if frame.owner is not None:
            owner = self.state.steps.get(frame.owner)
            if owner is not None and frame.id in owner.children:
                owner.children.remove(frame.id)

    def _variables(self, frame: Frame) -> dict[str, Any]:
        return {"input": self.state.input, "steps": self.state.view, **frame.scope}

    def _truth(self, key: str, variables: dict[str, Any]) -> bool:
        value = self.wf.expr(key).evaluate(variables)
        if not isinstance(value, bool):
            raise ExpressionError(f"{self.wf.expr(key).source!r} gave {type(value).__name__}, not a bool")
        return value

    def _update_view(self, step: StepState) -> None:
        self.state.view[step.step_id] = {
            "output": step.output,
            "status": step.status,
            "confidence": step.confidence,
            "attempt": step.attempt,
            "cached": step.cached,
        }

    def _add_cost(self, step: StepState, cost: dict[str, Any], models: dict[str, Any] | None = None) -> None:
        step.cost = _sum_cost(step.cost or {}, cost, models)
        self.state.cost = _sum_cost(self.state.cost, cost, models)

    def _too_big(self, output: Any) -> str | None:
        size = len(orjson.dumps(output))
        # An accepted output is held three times: the step's output, the CEL view and its frame's last output
        # (a next step whose input copies it adds more: enforce_size catches that). Measuring the whole state
        # costs as much as storing it, so measure only once the running estimate comes near the limit.
        projected = self.state.size_hint + 3 * size
        if projected * 2 < self.max_state_bytes:
            self.state.size_hint = projected
            return None
        projected = len(self.state.model_dump_json()) + 3 * size
        if projected > self.max_state_bytes:
            return f"an output of {size} bytes would grow the run's state to about {projected} bytes, over the limit of {self.max_state_bytes}"
        self.state.size_hint = projected
        return None

    def enforce_size(self) -> None:
        """The last guard: a state that still grew past the limit (fan-out outputs gathered in one list) fails
        the run and sheds its outputs, so the document stays storable."""
        if self.state.finished:
            return
        # fan-outs add state that no output estimate sees: count them in by the number of steps and frames
        hint = max(self.state.size_hint, 600 * (len(self.state.steps) + len(self.state.frames)))
        if hint * 2 < self.max_state_bytes:
            return
        size = len(self.state.model_dump_json())
        self.state.size_hint = size
        if size <= self.max_state_bytes:
            return
        for step in self.state.steps.values():
            step.output, step.results, step.items, step.request = None, {}, None, None
        for frame in self.state.frames.values():
            frame.last_output = None
        for entry in self.state.view.values():
            entry["output"] = None
        self.finish_run(False, None, ErrorInfo(type="ContextTooLarge", message=f"the run's state grew to {size} bytes, over the limit of {self.max_state_bytes}", retryable=False))

    def _step_of_request(self, request_id: str) -> StepState | None:
        """The step an earlier request of this run belonged to (ids are ``<run_id>/<step key>/<attempt>``)."""
        prefix = self.state.run_id + "/"
        if not request_id.startswith(prefix):
            return None
        key, _, attempt = request_id[len(prefix):].rpartition("/")
        step = self.state.steps.get(key)
        return step if step is not None and attempt.isdigit() and int(attempt) <= max(step.attempt, 1) else None

    def _made_here(self, request_id: str) -> bool:
        """Whether ``request_id`` is one of this run's whose step was dropped with its frame: a finished loop
        iteration (``#``) or map item (``[``), or a parallel branch that ran again (``~``: the first run of
        branch ``p/b`` is dropped when ``p/b~2`` starts)."""
        prefix = self.state.run_id + "/"
        key, _, attempt = request_id[len(prefix):].rpartition("/")
        if not (request_id.startswith(prefix) and attempt.isdigit()):
            return False
        if "#" in key or "[" in key or "~" in key:
            return True
        rerun = tuple(key[:i] + "~" for i, ch in enumerate(key) if ch == "/")
        return bool(rerun) and any(frame_id.startswith(rerun) for frame_id in self.state.frames)

    def _ignore(self, reason: str, detail: str) -> None:
        self.changed = False
        self.out.append(EventIgnored(run_id=self.state.run_id, reason=reason, detail=detail))


def _join_name(join: Any) -> str:
    return f"n_of {join.n_of}" if isinstance(join, NOf) else str(join)


def _sum_cost(total: dict[str, Any], cost: dict[str, Any], models: dict[str, Any] | None = None) -> dict[str, Any]:
    result = dict(total)
    for field in ("usd", "tokens_in", "tokens_out"):
        if field in cost:
            result[field] = round(result.get(field, 0) + cost[field], 9) if field == "usd" else result.get(field, 0) + cost[field]
    merged = dict(result.get("models", {}))
    if "model" in cost:
        merged[cost["model"]] = round(merged.get(cost["model"], 0) + cost.get("usd", 0), 9)
    for model, usd in (models or {}).items():
        merged[model] = round(merged.get(model, 0) + usd, 9)
    if merged:
        result["models"] = merged
    return result


def replay(machine: Machine, events: Iterable[tuple[Event, int]]) -> tuple[RunState | None, list[Command]]:
    """Fold ``(event, now_ms)`` pairs through ``machine``; for golden-log and determinism tests."""
    state: RunState | None = None
    commands: list[Command] = []
    for event, now in events:
        state, out = machine.decide(state, event, now)
        commands.extend(out)
    return state, commands
