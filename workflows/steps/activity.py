"""``activity:`` steps: a request to a worker, retried with back-off, bounded per attempt by its deadlines.

An attempt has up to four deadlines, each a timer armed in the run's state (docs/timeouts.md):

- ``timeout``: request to completion (``<step>:timeout:<attempt>``), always armed;
- ``start_timeout``: request to the handler starting (``<step>:start_timeout:<attempt>``), cleared by the worker's
  ``activity.started`` record (or a heartbeat, or the completion). A worker that never sends one fails it;
- ``run_timeout``: handler start to completion (``<step>:run_timeout:<attempt>``), armed by ``activity.started``: a
  worker that never sends one leaves the attempt bounded by ``timeout`` alone;
- ``heartbeat``: the longest silence of a started handler (``<step>:heartbeat:<attempt>:<beats>``), re-armed under a
  new id by each ``activity.heartbeat``.

Whichever fires first fails the attempt (``ActivityTimeout``, ``ActivityStartTimeout``, ``ActivityRunTimeout``,
``ActivityHeartbeatTimeout``, all retryable), and ``retry`` decides what comes next.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import orjson

from legato.topics.models import ActivityCompleted, ActivityHeartbeat, ActivityRequested, ActivityStarted, CachedResult, ErrorInfo, RequestCancelled
from legato.workflows import keys, run_limits, transitions
from legato.workflows.commands import CacheResult, CancelRequest, RequestActivity
from legato.workflows.model import DEFAULT_ACTIVITY_TIMEOUT, ActivityStep
from legato.workflows.state import StepState, StepStatus, Timer
from legato.workflows.steps.base import Processor

if TYPE_CHECKING:
    from legato.workflows.context import Run
    from legato.workflows.state import Frame, RunState


class ActivityProcessor(Processor):
    def redrive_frames(self, state: "RunState", step: StepState, definition: ActivityStep) -> list["Frame"]:
        return []

    def redrive(self, run: "Run", step: StepState, definition: ActivityStep) -> None:
        """The next attempt: attempts continue, so request ids never repeat and the failed attempt's late completion
        is stale. Its retries are what is left of ``retry.max_attempts`` (none when they were spent)."""
        request(run, step, definition, step.attempt + 1)

    def start(self, run: "Run", step: StepState, definition: ActivityStep, frame: "Frame", variables: dict[str, Any]) -> None:
        request(run, step, definition, 1, variables)

    def completed(self, run: "Run", event: ActivityCompleted) -> None:
        """A worker finished one of this run's requests (or a duplicate, stale or foreign completion came in)."""
        key = run.state.requests.get(event.request_id)
        if key is None:
            _refuse_completion(run, event)
            return
        step = run.state.steps.get(key)
        if step is None:  # its frame was dropped with it (Run.drop_frame cancels such requests)
            _refuse_completion(run, event)
            return
        if event.attempt != step.attempt or step.status != "running":
            run.ignore("stale_attempt", f"request {event.request_id} attempt {event.attempt}, step at {step.attempt} ({step.status})")
            return
        _clear_pending(run, step, *_used(event))
        if event.cost is not None:
            run.add_cost(step, event.cost.model_dump(exclude_none=True))
        step.confidence = event.confidence
        step.cached = bool(event.cached)
        if event.status == "succeeded":
            too_big = run.too_big(event.output)
            if too_big:
                self._attempt_failed(run, step, ErrorInfo(type="ContextTooLarge", message=too_big, retryable=False), "failed")
            else:
                step.output = event.output
                _cache(run, step, event)
                run.finish_step(step, "succeeded")
        else:
            error = event.error or ErrorInfo(type="ActivityFailed", message="the worker reported a failure without an error")
            self._attempt_failed(run, step, error, "failed")
        run.check_budget()

    def started(self, run: "Run", event: ActivityStarted | ActivityHeartbeat) -> None:
        """A worker's handler started on one of this run's requests (``activity.started``), or reported that it is
        alive (``activity.heartbeat``, which also counts as its start when no started record came first)."""
        heartbeat = isinstance(event, ActivityHeartbeat)
        key = run.state.requests.get(event.request_id)
        step = run.state.steps.get(key) if key is not None else None
        if step is None or event.attempt != step.attempt or step.status != "running":
            detail = f"request {event.request_id} attempt {event.attempt} is not pending"
            if heartbeat:
                run.ignore("stale_heartbeat", detail)
            else:
                run.ignore("stale_started", detail)
            return
        definition: ActivityStep = run.wf.steps[step.step_id]
        first = step.handler_started_ms is None
        if first and definition.watches_start:
            step.handler_started_ms = event.heartbeat_ms if heartbeat else event.started_ms
            run.clear_timer(keys.start_timeout(step.key, step.attempt))
            if definition.run_timeout is not None:
                run.set_timer(keys.run_timeout(step.key, step.attempt), definition.run_timeout, "activity_run_timeout", target=step.key, attempt=step.attempt)
            if definition.heartbeat is not None and not heartbeat:
                run.set_timer(keys.heartbeat_timer(step.key, step.attempt, 0), definition.heartbeat, "activity_heartbeat", target=step.key, attempt=step.attempt)
        if heartbeat and definition.heartbeat is not None:
            run.clear_timer(keys.heartbeat_timer(step.key, step.attempt, step.heartbeats))
            step.heartbeats += 1
            run.set_timer(keys.heartbeat_timer(step.key, step.attempt, step.heartbeats), definition.heartbeat, "activity_heartbeat", target=step.key,
                          attempt=step.attempt)
        elif not first or not definition.watches_start:
            # a second started record, or a record the step does not watch (it sets none of start_timeout, run_timeout,
            # heartbeat): nothing to change
            detail = f"request {event.request_id} attempt {event.attempt}"
            if heartbeat:
                run.ignore("unwatched_heartbeat", detail)
            elif first:
                run.ignore("unwatched_started", detail)
            else:
                run.ignore("duplicate_started", detail)

    def timer(self, run: "Run", step: StepState, timer: Timer) -> None:
        if timer.kind in _DEADLINES and step.status == "running" and step.attempt == timer.attempt:
            error_type, what = _DEADLINES[timer.kind]
            run.events.append(transitions.AttemptTimedOut(run_id=run.state.run_id, workflow=run.state.workflow, step_id=step.step_id, deadline=what))
            if timer.kind == "activity_timeout":
                _clear_pending(run, step)  # the worker stops at the request's deadline by itself
            else:
                self.cancel(run, step, f"{what} expired")  # the handler may still be queued or running: its worker stops it
            self._attempt_failed(run, step, ErrorInfo(type=error_type, message=f"attempt {step.attempt} {_EXPLAIN[timer.kind]}", retryable=True), "timed_out")
        elif timer.kind == "retry" and step.status == "waiting_retry":
            request(run, step, run.wf.steps[step.step_id], step.attempt + 1)

    def cancel(self, run: "Run", step: StepState, reason: str) -> bool:
        waiting = step.limit_hold is not None and step.limit_hold["waiting"]  # its request was never sent
        if waiting:
            _clear_pending(run, step)
            return True
        pending = step.request_id is not None and step.request_id in run.state.requests
        if pending:
            activity = run.wf.steps[step.step_id].activity if run.wf else ""
            run.out.append(CancelRequest(cancel=RequestCancelled(request_id=step.request_id, run_id=run.state.run_id, activity=activity, reason=reason)))
        _clear_pending(run, step)
        return pending

    def _attempt_failed(self, run: "Run", step: StepState, error: ErrorInfo, final_status: StepStatus) -> None:
        definition = run.wf.steps[step.step_id]
        step.error = error
        retryable = error.retryable and error.type not in definition.non_retryable
        if error.type == RATE_LIMITED:
            run.events.append(transitions.AttemptRateLimited(run_id=run.state.run_id, workflow=run.state.workflow, step_id=step.step_id))
        if retryable and step.attempt < definition.retry.max_attempts:
            transitions.move(run, step, "waiting_retry")
            if error.type == RATE_LIMITED and error.retry_after_ms is not None:
                delay = error.retry_after_ms / 1000  # what the rate-limited API asked for, not the back-off
            else:
                delay = definition.retry.delay(step.attempt)
                if definition.retry.jitter:
                    delay = min(delay * _jitter(keys.request_id(run.state.run_id, step.key, step.attempt)), definition.retry.max_backoff)
            run.set_timer(keys.retry_timer(step.key, step.attempt), delay, "retry", target=step.key, attempt=step.attempt)
            return
        run.failed_finally(step, error, final_status)


RATE_LIMITED = "RateLimited"
"""The error type of an attempt refused for a rate limit (``legato.handlers.registry.RateLimited``, or an independent
worker's error of that type): its ``retry_after_ms`` replaces the retry back-off."""

_DEADLINES = {
    "activity_timeout": ("ActivityTimeout", "timeout"),
    "activity_start_timeout": ("ActivityStartTimeout", "start_timeout"),
    "activity_run_timeout": ("ActivityRunTimeout", "run_timeout"),
    "activity_heartbeat": ("ActivityHeartbeatTimeout", "heartbeat"),
}
"""Timer kind → the error type of the attempt it fails, and the YAML key of the deadline."""

_EXPLAIN = {
    "activity_timeout": "took longer than its timeout",
    "activity_start_timeout": "did not start within its start_timeout (no activity.started from a worker)",
    "activity_run_timeout": "ran longer than its run_timeout after its handler started",
    "activity_heartbeat": "sent no heartbeat within its heartbeat interval",
}


def request(run: "Run", step: StepState, definition: ActivityStep, attempt: int, variables: dict[str, Any] | None = None) -> None:
    """Send attempt ``attempt`` of an activity step (the first renders its input; a retry resends it)."""
    if variables is None:
        variables = run.variables(run.state.frames[step.frame])
    if attempt == 1 or step.request is None:
        payload = run.wf.templates[definition.id].render(variables, run.claims)
        if payload is None:
            payload = {}
    else:
        payload = step.request["input"]
    timeout = definition.timeout if definition.timeout is not None else DEFAULT_ACTIVITY_TIMEOUT
    req = ActivityRequested(
        request_id=keys.request_id(run.state.run_id, step.key, attempt),
        run_id=run.state.run_id,
        step_id=definition.id,
        activity=definition.activity,
        attempt=attempt,
        input=payload,
        deadline=run.now + round(timeout * 1000),
        workflow=run.state.workflow,
        requested_ms=run.now,
        run_started_ms=run.state.started_ms,
        cache_ttl_ms=round(definition.cache.ttl * 1000) if definition.cache else None,
        batch={"max_size": definition.batch.max_size, "max_wait_ms": round(definition.batch.max_wait * 1000)} if definition.batch else None,
        rate_limit=definition.rate_limit.per_second if definition.rate_limit else None,
        report_started=True if definition.watches_start else None,
        heartbeat_ms=round(definition.heartbeat * 1000) if definition.heartbeat is not None else None,
    )
    transitions.move(run, step, "running")
    step.attempt = attempt
    step.handler_started_ms = None
    step.heartbeats = 0
    step.request_id = req.request_id
    step.request = req.model_dump(mode="json", exclude_none=True)
    run.grow(len(orjson.dumps(step.request)))
    if definition.limit is not None:  # held back until the limiter grants it (run_limits)
        refused = run_limits.acquire_for_step(run, step, definition, req, variables)
        if refused is not None:
            step.request = None
            run.failed_finally(step, refused, "failed")
            return
    else:
        run.state.requests[req.request_id] = step.key
        run.out.append(RequestActivity(request=req))
    # the deadlines run from here: the time waiting for a limit counts toward timeout and start_timeout
    run.set_timer(keys.attempt_timeout(step.key, attempt), timeout, "activity_timeout", target=step.key, attempt=attempt)
    if definition.start_timeout is not None:
        run.set_timer(keys.start_timeout(step.key, attempt), definition.start_timeout, "activity_start_timeout", target=step.key, attempt=attempt)


def _cache(run: "Run", step: StepState, event: ActivityCompleted) -> None:
    """A ``cache: {ttl}`` step succeeded: store the result under its request's activity and input, whichever worker
    answered (one that knows nothing of the cache, too). A result that came from the cache is not stored again: its
    ``stored_ms`` would move on and the entry would never expire."""
    request = step.request
    if event.cached or not request or not request.get("cache_ttl_ms"):
        return
    result = CachedResult(output=event.output, confidence=event.confidence, stored_ms=run.now)
    run.out.append(CacheResult(activity=request["activity"], input=request.get("input"), result=result))


def _used(event: ActivityCompleted) -> tuple[int | None, int | None]:
    """The tokens a completion reports (what its limit is charged) and the pause a 429 asks for."""
    cost = event.cost
    tokens = None if cost is None or (cost.tokens_in is None and cost.tokens_out is None) else (cost.tokens_in or 0) + (cost.tokens_out or 0)
    error = event.error
    pause = error.retry_after_ms if error is not None and error.type == RATE_LIMITED else None
    return tokens, pause


def _clear_pending(run: "Run", step: StepState, tokens: int | None = None, pause_ms: int | None = None) -> None:
    run_limits.release(run, step, tokens, pause_ms)
    if step.request_id:
        run.state.requests.pop(step.request_id, None)
    run.clear_timer(keys.attempt_timeout(step.key, step.attempt))
    run.clear_timer(keys.start_timeout(step.key, step.attempt))
    run.clear_timer(keys.run_timeout(step.key, step.attempt))
    run.clear_timer(keys.heartbeat_timer(step.key, step.attempt, step.heartbeats))
    run.clear_timer(keys.retry_timer(step.key, step.attempt))


def _refuse_completion(run: "Run", event: ActivityCompleted) -> None:
    """A completion for no pending request: say why (duplicate, stale or never made here)."""
    earlier = _step_of_request(run, event.request_id)
    if earlier is not None and earlier.request_id == event.request_id:
        run.ignore("duplicate_completion", f"request {event.request_id} already completed ({earlier.status})")
    elif earlier is not None:
        run.ignore("stale_attempt", f"request {event.request_id} is no longer pending (step {earlier.key} at attempt {earlier.attempt}, {earlier.status})")
    elif _made_here(run, event.request_id):
        run.ignore("stale_attempt", f"request {event.request_id} belongs to a finished loop iteration or map item, or a branch that ran again")
    else:
        run.ignore("unknown_request", f"request {event.request_id} was never made by this run")


def _step_of_request(run: "Run", request_id: str) -> StepState | None:
    """The step an earlier request of this run belonged to."""
    parsed = keys.parse_request_id(run.state.run_id, request_id)
    if parsed is None:
        return None
    key, attempt = parsed
    step = run.state.steps.get(key)
    return step if step is not None and attempt <= max(step.attempt, 1) else None


def _made_here(run: "Run", request_id: str) -> bool:
    """Whether ``request_id`` is one of this run's whose step was dropped with its frame: a finished loop
    iteration or map item, or a parallel branch that ran again (the first run of branch ``p/b`` is dropped when
    ``p/b~2`` starts)."""
    parsed = keys.parse_request_id(run.state.run_id, request_id)
    if parsed is None:
        return False
    key = parsed[0]
    if keys.is_transient(key):
        return True
    reruns = keys.reruns_of(key)
    return bool(reruns) and any(frame_id.startswith(reruns) for frame_id in run.state.frames)


def _jitter(seed: str) -> float:
    """A factor in [0.8, 1.2) derived from ``seed``: retries of many runs spread out, replays stay identical."""
    digest = hashlib.blake2b(seed.encode(), digest_size=4).digest()
    return 0.8 + 0.4 * int.from_bytes(digest, "big") / 2**32
