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

from topics.models import ActivityCompleted, ActivityRequested, ErrorInfo, RunAccepted, RunEvent, TimerFired
from workflows.expressions import ExpressionError
from workflows.model import (
    DEFAULT_ACTIVITY_TIMEOUT,
    ENGINE_MAX_ITERATIONS,
    ActivityStep,
    ChoiceStep,
    CompiledWorkflow,
    EndStep,
    FailStep,
    LoopStep,
    ParallelStep,
    step_kind,
)
from workflows.state import Frame, RunState, StepState, Timer

Event = Union[RunAccepted, ActivityCompleted, TimerFired]


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


class EventIgnored(_Command):
    """A refused transition: duplicate, stale or unknown. Counted by the shell, never silently dropped."""

    run_id: str
    reason: str  # duplicate_trigger | unknown_run | run_finished | duplicate_completion | unknown_request | stale_attempt | stale_timer
    detail: str = ""


Command = Union[RequestActivity, StartTimer, PublishRunEvent, EventIgnored]


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Machine:
    """Decides runs of the given workflow definitions."""

    def __init__(self, workflows: Mapping[str, CompiledWorkflow]):
        self.workflows = dict(workflows)

    def decide(self, state: RunState | None, event: Event, now_ms: int) -> tuple[RunState | None, list[Command]]:
        """Apply ``event`` to a copy of ``state``; return the new state and the commands to carry out."""
        if isinstance(event, RunAccepted):
            if state is not None:
                return state, [EventIgnored(run_id=event.run_id, reason="duplicate_trigger")]
            return self._start(event, now_ms)
        if state is None:
            return None, [EventIgnored(run_id=event.run_id, reason="unknown_run", detail=_describe(event))]
        if state.finished:
            return state, [EventIgnored(run_id=state.run_id, reason="run_finished", detail=_describe(event))]
        wf = self.workflows.get(state.workflow)
        if wf is None:  # the definition was removed while the run was in flight
            run = _Run(state.model_copy(deep=True), None, now_ms)
            run.finish_run(False, None, ErrorInfo(type="UnknownWorkflow", message=f"workflow {state.workflow!r} is no longer loaded", retryable=False))
            return run.state, run.out
        run = _Run(state.model_copy(deep=True), wf, now_ms)
        if isinstance(event, ActivityCompleted):
            run.on_completion(event)
        else:
            run.on_timer(event)
        run.drain()
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
        )
        run = _Run(state, wf, now_ms)
        if wf is None:
            known = ", ".join(sorted(self.workflows)) or "none"
            run.finish_run(False, None, ErrorInfo(type="UnknownWorkflow", message=f"no workflow named {event.workflow!r} (loaded: {known})", retryable=False))
            return run.state, run.out
        run.publish("run.started")
        if wf.definition.timeout is not None:
            run.set_timer("run:timeout", wf.definition.timeout, "run_timeout")
        run.state.frames["root"] = Frame(id="root", ref="root")
        run.advance("root")
        run.drain()
        return run.state, run.out


def outstanding(state: RunState) -> list[Command]:
    """Commands that a replayed event must re-issue after a crash: pending requests, timers, the terminal event.

    Re-issuing is safe: request ids are deterministic, so workers and the coordinator drop duplicates.
    """
    out: list[Command] = []
    for key in state.requests.values():
        step = state.steps[key]
        if step.request is not None:
            out.append(RequestActivity(request=ActivityRequested.model_validate(step.request)))
    for timer_id, timer in state.timers.items():
        out.append(StartTimer(run_id=state.run_id, timer_id=timer_id, due_ms=timer.due_ms))
    if state.finished:
        out.append(PublishRunEvent(event=_terminal_event(state)))
    return out


def _describe(event: Event) -> str:
    if isinstance(event, ActivityCompleted):
        return f"request {event.request_id} attempt {event.attempt}"
    if isinstance(event, TimerFired):
        return f"timer {event.timer_id}"
    return ""


def _terminal_event(state: RunState) -> RunEvent:
    ok = state.status == "succeeded"
    finished = state.finished_ms or state.started_ms
    return RunEvent(
        type="run.completed" if ok else "run.failed",
        run_id=state.run_id,
        workflow=state.workflow,
        status="succeeded" if ok else "failed",
        output=state.output if ok else None,
        error=None if ok else state.error,
        started_at=iso(state.started_ms),
        finished_at=iso(finished),
        duration_ms=finished - state.started_ms,
        correlation_id=state.correlation_id,
        path=list(state.path),
        cost=dict(state.cost) or None,
    )


class _Run:
    """One decision in progress: mutates its own copy of the state and collects commands."""

    def __init__(self, state: RunState, wf: CompiledWorkflow | None, now_ms: int):
        self.state = state
        self.wf = wf
        self.now = now_ms
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
        if event.status == "succeeded":
            step.output = event.output
            self.finish_step(step, "succeeded")
        else:
            error = event.error or ErrorInfo(type="ActivityFailed", message="the worker reported a failure without an error")
            self.attempt_failed(step, error, "failed")

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
            self.attempt_failed(step, ErrorInfo(type="ActivityTimeout", message=f"attempt {step.attempt} took longer than its timeout", retryable=True), "timed_out")
        elif timer.kind == "retry" and step.status == "waiting_retry":
            self._request(step, self.wf.steps[step.step_id], step.attempt + 1)
        elif timer.kind == "loop_timeout" and step.status == "running":
            self._cancel_children(step)
            self._loop_exhausted(step, "timeout", step.output)

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
        frame = self.state.frames[frame_id]
        if self.state.finished or frame.status != "running":
            return  # cancelled (a failed sibling, a finished run) while it waited in the queue
        steps = self.wf.sequences[frame.ref]
        if frame.index >= len(steps):
            frame.status = "succeeded"
            self._frame_finished(frame)
            return
        self._start_step(steps[frame.index], frame)

    def _frame_finished(self, frame: Frame) -> None:
        if frame.owner is None:
            self.finish_run(frame.status == "succeeded", frame.last_output, frame.error)
            return
        owner = self.state.steps[frame.owner]
        if owner.status != "running":
            return
        definition = self.wf.steps[owner.step_id]
        if isinstance(definition, ParallelStep):
            self._parallel_branch_finished(owner, frame)
        elif isinstance(definition, ChoiceStep):
            owner.output = frame.last_output
            owner.error = frame.error
            self.finish_step(owner, "succeeded" if frame.status == "succeeded" else "failed")
        elif isinstance(definition, LoopStep):
            self._loop_iteration_finished(owner, definition, frame)

    def _child_frame(self, owner: StepState, frame_id: str, ref: str, parent: Frame, **scope: Any) -> Frame:
        frame = Frame(id=frame_id, ref=ref, owner=owner.key, scope={**parent.scope, **scope})
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
        variables = self._variables(frame)
        try:
            if isinstance(definition, ActivityStep):
                self._request(step, definition, 1, variables)
            elif isinstance(definition, ParallelStep):
                frames = [
                    self._child_frame(step, f"{key}/{name}", f"{definition.id}/{name}", frame)
                    for name in definition.parallel.branches
                ]
                for child in frames:  # all frames exist before any starts, so no join fires early
                    self.advance(child.id)
            elif isinstance(definition, ChoiceStep):
                path = self._choose(definition, variables)
                step.path = path
                self.state.path.append(f"{definition.id}:{path}")
                ref = f"{definition.id}/{path}"
                child = self._child_frame(step, f"{key}/{path}", ref, frame)
                self.advance(child.id)
            elif isinstance(definition, LoopStep):
                step.iteration = 0
                if definition.loop.timeout is not None:
                    self.set_timer(f"{key}:loop_timeout", definition.loop.timeout, "loop_timeout", target=key)
                child = self._child_frame(step, f"{key}#0", f"{definition.id}/body", frame, iteration=0, previous=None)
                self.advance(child.id)
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
            self._cancel_children(step)
            self.finish_step(step, "failed")

    def finish_step(self, step: StepState, status: str, output: Any = None) -> None:
        """Record a terminal status and move the step's frame on (or fail it)."""
        if output is not None:
            step.output = output
        step.status = status
        step.finished_ms = self.now
        self._update_view(step)
        frame = self.state.frames[step.frame]
        if frame.status != "running" or self.state.finished:
            return
        if status in ("succeeded", "skipped"):
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
        if error.retryable and step.attempt < definition.retry.max_attempts:
            step.status = "waiting_retry"
            self.set_timer(f"{step.key}:retry:{step.attempt}", definition.retry.delay(step.attempt), "retry", target=step.key, attempt=step.attempt)
            return
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
        )
        step.status = "running"
        step.attempt = attempt
        step.request_id = request.request_id
        step.request = request.model_dump(mode="json", exclude_none=True)
        self.state.requests[request.request_id] = step.key
        self.out.append(RequestActivity(request=request))
        self.set_timer(f"{step.key}:timeout:{attempt}", timeout, "activity_timeout", target=step.key, attempt=attempt)

    # --- parallel -------------------------------------------------------------------------------

    def _parallel_branch_finished(self, step: StepState, frame: Frame) -> None:
        if frame.status != "succeeded":
            step.error = frame.error
            self._cancel_children(step)
            self.finish_step(step, "failed")
            return
        frames = [self.state.frames[f] for f in step.children]
        if all(f.status == "succeeded" for f in frames):
            prefix = f"{step.step_id}/"
            step.output = {f.ref[len(prefix):]: f.last_output for f in frames}
            self.finish_step(step, "succeeded")

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

    def _loop_iteration_finished(self, step: StepState, definition: LoopStep, frame: Frame) -> None:
        if frame.status != "succeeded":
            step.error = frame.error
            step.ended_by = "failed"
            self._clear_timer(f"{step.key}:loop_timeout")
            self.finish_step(step, "failed")
            return
        step.output = frame.last_output
        iteration = step.iteration or 0
        spec = definition.loop
        if spec.until is not None:
            variables = {**self._variables(frame), "iteration": iteration}
            try:
                done = self._truth(f"{definition.id}.until", variables)
            except ExpressionError as exc:
                step.error = ErrorInfo(type="ExpressionError", message=f"step {definition.id}: {exc}", retryable=False)
                self._clear_timer(f"{step.key}:loop_timeout")
                self.finish_step(step, "failed")
                return
            if done:
                self._clear_timer(f"{step.key}:loop_timeout")
                step.ended_by = "until"
                self.finish_step(step, "succeeded")
                return
        if iteration + 1 >= min(spec.max_iterations, ENGINE_MAX_ITERATIONS):
            self._loop_exhausted(step, "max_iterations", step.output)
            return
        step.iteration = iteration + 1
        parent = self.state.frames[step.frame]
        child = self._child_frame(step, f"{step.key}#{iteration + 1}", f"{definition.id}/body", parent, iteration=iteration + 1, previous=frame.last_output)
        self.advance(child.id)

    def _loop_exhausted(self, step: StepState, bound: str, output: Any) -> None:
        definition = self.wf.steps[step.step_id]
        self._clear_timer(f"{step.key}:loop_timeout")
        step.ended_by = bound
        if definition.loop.until is None and bound == "max_iterations":
            self.finish_step(step, "succeeded", output=output)  # a plain counted loop ran to its end
        elif definition.loop.on_exhausted == "continue":
            self.finish_step(step, "succeeded", output=output)
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
                ok, output = False, None
                error = ErrorInfo(type="ExpressionError", message=f"workflow output: {exc}", retryable=False)
        for key in list(state.requests.values()):
            step = state.steps[key]
            step.status, step.finished_ms = "cancelled", self.now
        state.requests.clear()
        state.timers.clear()
        for frame in state.frames.values():
            if frame.status == "running":
                frame.status = "cancelled" if not ok or frame.owner is not None else "succeeded"
        state.status = "succeeded" if ok else "failed"
        state.output = output if ok else None
        state.error = None if ok else (error or ErrorInfo(type="RunFailed", message="the run failed", retryable=False))
        state.finished_ms = self.now
        completion_topic = self.wf.definition.completion_topic if self.wf else None
        self.out.append(PublishRunEvent(event=_terminal_event(state), completion_topic=completion_topic))

    def publish(self, kind: str) -> None:
        s = self.state
        self.out.append(
            PublishRunEvent(
                event=RunEvent(type=kind, run_id=s.run_id, workflow=s.workflow, status="running", started_at=iso(s.started_ms), correlation_id=s.correlation_id)
            )
        )

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

    def _cancel_children(self, step: StepState) -> None:
        """Cancel every unfinished step below ``step`` (lost races, failed siblings)."""
        for frame_id in step.children:
            frame = self.state.frames[frame_id]
            if frame.status == "running":
                frame.status = "cancelled"
        prefixes = (step.key + "/", step.key + "#")
        for other in self.state.steps.values():
            if other.key.startswith(prefixes) and other.status in ("running", "waiting_retry"):
                self._clear_pending(other)
                self._clear_timer(f"{other.key}:loop_timeout")
                other.status, other.finished_ms = "cancelled", self.now
                self._update_view(other)

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
        }

    def _add_cost(self, step: StepState, cost: dict[str, Any]) -> None:
        step.cost = _sum_cost(step.cost or {}, cost)
        self.state.cost = _sum_cost(self.state.cost, cost)

    def _step_of_request(self, request_id: str) -> StepState | None:
        """The step an earlier request of this run belonged to (ids are ``<run_id>/<step key>/<attempt>``)."""
        prefix = self.state.run_id + "/"
        if not request_id.startswith(prefix):
            return None
        key, _, attempt = request_id[len(prefix):].rpartition("/")
        step = self.state.steps.get(key)
        return step if step is not None and attempt.isdigit() and int(attempt) <= max(step.attempt, 1) else None

    def _ignore(self, reason: str, detail: str) -> None:
        self.changed = False
        self.out.append(EventIgnored(run_id=self.state.run_id, reason=reason, detail=detail))


def _sum_cost(total: dict[str, Any], cost: dict[str, Any]) -> dict[str, Any]:
    result = dict(total)
    for field in ("usd", "tokens_in", "tokens_out"):
        if field in cost:
            result[field] = round(result.get(field, 0) + cost[field], 9) if field == "usd" else result.get(field, 0) + cost[field]
    if "model" in cost:
        models = dict(result.get("models", {}))
        models[cost["model"]] = round(models.get(cost["model"], 0) + cost.get("usd", 0), 9)
        result["models"] = models
    return result


def replay(machine: Machine, events: Iterable[tuple[Event, int]]) -> tuple[RunState | None, list[Command]]:
    """Fold ``(event, now_ms)`` pairs through ``machine``; for golden-log and determinism tests."""
    state: RunState | None = None
    commands: list[Command] = []
    for event, now in events:
        state, out = machine.decide(state, event, now)
        commands.extend(out)
    return state, commands
