"""The pure state machine: ``decide(state, event, now_ms) -> (state, commands)``.

No Kafka, no clock, no randomness: the shell passes the time in, request and timer ids are derived from the
run_id and the step's place in the run (``keys``), so replaying the same events yields the same state and
commands. Each event goes to the processor of the step kind it concerns (``steps``); a step's status changes only
through ``transitions``, which also emits the domain events that ``decide_events`` returns next to the commands.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Union

from legato.topics.models import (
    ActivityCompleted,
    ActivityHeartbeat,
    ActivityRequested,
    ActivityStarted,
    ChildRunFinished,
    ErrorInfo,
    RunAccepted,
    RunCancelRequested,
    RunForkAccepted,
    RunForkRequested,
    RunRedriveRequested,
    SignalSent,
    TimerFired,
)
from legato.topics.limits import LimitGranted
from legato.topics.payload_refs import refs_in
from legato.workflows import keys, run_limits
from legato.workflows.catalog import Catalog, Definition
from legato.workflows.claims import Claims, Lookup
from legato.workflows.lifecycle import DEFAULT_RETENTION_S, fork_seed, redrive_refusal
from legato.workflows.commands import (
    CacheResult,
    CancelChildRun,
    CancelRequest,
    Command,
    EventIgnored,
    ForgetRun,
    KeepUnusedPayloads,
    ForgetPayloads,
    NotifyParent,
    PublishRunEvent,
    RequestActivity,
    SignalRefused,
    StartChildRun,
    StartForkedRun,
    StartTimer,
)
from legato.workflows.context import Run
from legato.workflows.model import MAX_WORKFLOW_DEPTH, CompiledWorkflow, Limit, step_kind
from legato.workflows.run_events import child_finished, iso, parent_waits, terminal_event
from legato.workflows.run_size import DEFAULT_MAX_STATE_BYTES
from legato.workflows.state import SCHEMA_VERSION, Frame, RunState, StepState
from legato.workflows.steps import processor
from legato.workflows.steps.activity import ActivityProcessor, _jitter
from legato.workflows.steps.fanout import BRANCH_ATTEMPTS, DEFAULT_MAP_CONCURRENCY
from legato.workflows.steps.subworkflow import SubWorkflowProcessor
from legato.workflows.steps.wait import WaitProcessor
from legato.workflows.transitions import DomainEvent, SignalIgnored

Event = Union[RunAccepted, LimitGranted, ActivityCompleted, ActivityStarted, ActivityHeartbeat, TimerFired, ChildRunFinished, RunCancelRequested, SignalSent, RunRedriveRequested, RunForkRequested,
              RunForkAccepted]

__all__ = [
    "BRANCH_ATTEMPTS", "DEFAULT_MAP_CONCURRENCY", "DEFAULT_MAX_STATE_BYTES", "CacheResult", "CancelChildRun", "CancelRequest", "Command",
    "Decision", "Event", "EventIgnored", "ForgetRun", "ForgetPayloads", "KeepUnusedPayloads", "Machine", "redrive_target", "NotifyParent", "PublishRunEvent", "RequestActivity", "SignalRefused",
    "StartChildRun", "StartTimer", "iso", "outstanding", "replay", "_jitter",
]


class Decision(NamedTuple):
    """A decision: the run's new state, the commands for the shell, and the domain events of what happened."""

    state: RunState | None
    commands: list[Command]
    events: list[DomainEvent]


class Machine:
    """Decides runs of the deployed workflow definitions, each run by the definition it is pinned to."""

    def __init__(self, definitions: Catalog | Callable[[], Catalog] | Mapping[str, CompiledWorkflow], *,
                 max_state_bytes: int = DEFAULT_MAX_STATE_BYTES, default_retention_s: float = DEFAULT_RETENTION_S, payloads: Lookup | None = None):
        """``definitions``: the catalog, or a function returning the current one (a coordinator's live table); a
        mapping of name to compiled workflow is a fixed catalog of those (tests, tools), whose runs pin no sha256.
        ``default_retention_s``: how long a finished run is kept when its workflow sets no ``retention``.
        ``payloads``: the values of payload references the shell fetched (``legato.workflows.claims``): expressions
        see values, the run keeps references. A decision that needs one not fetched raises ``PayloadsMissing``; with
        None, expressions see the references themselves."""
        if isinstance(definitions, Mapping):
            definitions = Catalog.of([Definition(wf, "") for wf in definitions.values()])
        if isinstance(definitions, Catalog):
            fixed = definitions
            definitions = lambda: fixed  # noqa: E731
        self.definitions: Callable[[], Catalog] = definitions
        self.max_state_bytes = max_state_bytes
        self.default_retention_s = default_retention_s
        self.payloads = payloads

    def _claims(self) -> Claims | None:
        """What one decision's expressions see of payload references (a fresh memo per decision)."""
        return Claims(self.payloads) if self.payloads is not None else None

    def pinned(self, state: RunState) -> Definition | None:
        """The definition ``state`` is pinned to, or None when it is no longer deployed as it was."""
        definition = self.definitions().get(state.workflow, state.version)
        if definition is None or (state.sha256 and definition.sha256 != state.sha256):
            return None
        return definition

    def limit(self, name: str) -> Limit | None:
        """A deployed limit (a workflow's own ``limits:`` come first: ``Run.limit``)."""
        return self.definitions().limit(name)

    def decide(self, state: RunState | None, event: Event, now_ms: int, *, in_place: bool = False) -> tuple[RunState | None, list[Command]]:
        """Apply ``event`` to a copy of ``state``; return the new state and the commands to carry out.

        ``in_place=True`` skips the copy and changes ``state`` itself: for a caller that owns a state it just
        decoded and discards on error (the coordinator), since a deep copy costs more than the decision.
        """
        decision = self.decide_events(state, event, now_ms, in_place=in_place)
        return decision.state, decision.commands

    def decide_events(self, state: RunState | None, event: Event, now_ms: int, *, in_place: bool = False) -> Decision:
        """``decide``, with the domain events of the decision (for metrics and views)."""
        decision = self._decide_events(state, event, now_ms, in_place=in_place)
        if not isinstance(event, ActivityCompleted):
            return decision
        ignored = bool(decision.commands) and all(isinstance(c, EventIgnored) for c in decision.commands)
        # payloads stored under the run's id that nothing in its state will refer to: an ignored completion's output,
        # and any attempt's progress chunks stored by reference
        entries = _payload_entries(event.run_id, event.output) if ignored else []
        if event.progress_payloads:
            entries += [p.model_dump(exclude_none=True) for p in event.progress_payloads if p.id.startswith(event.run_id + "/")]
        if not entries:
            return decision
        if decision.state is not None:
            # a decision that holds the caller's state itself (an ignored event) copies it unless the caller allows in place
            return _keep_unused_payloads(decision, entries, copy=decision.state is state and not in_place)
        if state is None:
            return _forget_orphan_payloads(decision, event.run_id, entries)
        return decision

    def _decide_events(self, state: RunState | None, event: Event, now_ms: int, *, in_place: bool = False) -> Decision:
        if isinstance(event, RunAccepted):
            if state is not None:
                return Decision(state, [EventIgnored(run_id=event.run_id, reason="duplicate_trigger")], [])
            return self._start(event, now_ms)
        if isinstance(event, RunRedriveRequested):
            return self._redrive(state, event, now_ms, in_place)
        if isinstance(event, RunForkRequested):
            return self._fork(state, event)
        if isinstance(event, RunForkAccepted):
            if state is not None:
                return Decision(state, [EventIgnored(run_id=event.run_id, reason="duplicate_trigger", detail=f"fork of {event.forked_from}")], [])
            return self._start_forked(event, now_ms)
        if isinstance(event, LimitGranted) and (state is None or state.finished):
            out: list[Command] = []
            run_limits.unwanted(out, event, event.run_id)
            return Decision(state, out, [])
        if state is None:
            return Decision(None, [EventIgnored(run_id=event.run_id, reason="unknown_run", detail=_describe(event))], _signal_ignored(event, "", "unknown_run"))
        if state.finished and isinstance(event, TimerFired) and _retention_over(state, event.timer_id):
            return Decision(None, [ForgetRun(run_id=state.run_id, workflow=state.workflow)], [])
        if state.finished:
            return Decision(state, [EventIgnored(run_id=state.run_id, reason="run_finished", detail=_describe(event))], _signal_ignored(event, state.workflow, "run_finished"))
        definition = self.pinned(state)
        wf = definition.workflow if definition is not None else None
        run = Run(state if in_place else state.model_copy(deep=True), wf, now_ms, self.max_state_bytes, self.default_retention_s, self.limit, claims=self._claims())
        if isinstance(event, RunCancelRequested):
            run.cancel_run(event)
            return Decision(run.state, run.out, run.events)
        if wf is None:  # removed, or other text deployed under its name@version, while the run was in flight
            run.finish_run(False, None, ErrorInfo(type="DefinitionChanged", message=self._gone(state), retryable=False))
            return Decision(run.state, run.out, run.events)
        if isinstance(event, LimitGranted):
            run_limits.granted(run, event)
        elif isinstance(event, ActivityCompleted):
            _activities.completed(run, event)
        elif isinstance(event, (ActivityStarted, ActivityHeartbeat)):
            _activities.started(run, event)
        elif isinstance(event, ChildRunFinished):
            _subworkflows.child_run_finished(run, event)
        elif isinstance(event, SignalSent):
            _waits.signalled(run, event)
        else:
            run.on_timer(event.timer_id)
        run.drain()
        run.stop_for_budget()
        run.enforce_size()
        if not run.changed:
            return Decision(state, run.out, run.events)
        return Decision(run.state, run.out, run.events)

    def _start(self, event: RunAccepted, now_ms: int) -> Decision:
        # the one place a run's version is chosen: later decisions use what the state records
        catalog = self.definitions()
        definition = catalog.resolve(event.workflow, event.version)
        wf = definition.workflow if definition is not None else None
        state = RunState(
            schema_version=SCHEMA_VERSION,
            run_id=event.run_id,
            workflow=event.workflow,
            version=definition.version if definition is not None else (event.version or 0),
            sha256=definition.sha256 if definition is not None else "",
            input=event.input,
            correlation_id=event.correlation_id,
            parent=event.parent,
            started_ms=now_ms,
            depth=int((event.parent or {}).get("depth", 0)),
            priority=event.priority,
        )
        run = Run(state, wf, now_ms, self.max_state_bytes, self.default_retention_s, self.limit, claims=self._claims())
        if wf is None:
            run.finish_run(False, None, ErrorInfo(type="UnknownWorkflow", message=_unknown(catalog, event), retryable=False))
            return Decision(run.state, run.out, run.events)
        if wf.definition.limits_only:
            run.finish_run(False, None, ErrorInfo(type="NotRunnable", message=f"{event.workflow!r} only declares limits: it has no steps to run", retryable=False))
            return Decision(run.state, run.out, run.events)
        if state.depth > MAX_WORKFLOW_DEPTH:
            run.finish_run(False, None, ErrorInfo(type="DepthExceeded", message=f"sub-workflows nest deeper than {MAX_WORKFLOW_DEPTH}", retryable=False))
            return Decision(run.state, run.out, run.events)
        run.publish("run.started")
        if wf.definition.timeout is not None:
            run.set_timer(keys.RUN_TIMEOUT, wf.definition.timeout, "run_timeout")
        run.state.frames["root"] = Frame(id="root", ref="root")
        if not run_limits.acquire_for_run(run, event.triggered_ms):  # a run beyond its concurrency key's limit starts when granted
            run.advance("root")
        run.drain()
        run.enforce_size()
        return Decision(run.state, run.out, run.events)


    def _redrive(self, state: RunState | None, event: RunRedriveRequested, now_ms: int, in_place: bool) -> Decision:
        refusal = redrive_refusal(state)
        if state is None or refusal is not None:
            return Decision(state, [EventIgnored(run_id=event.run_id, reason="redrive_refused", detail=refusal or "")], [])
        definition = self.pinned(state)
        step = redrive_target(state, definition)
        if isinstance(step, str):
            return Decision(state, [EventIgnored(run_id=event.run_id, reason="redrive_refused", detail=step)], [])
        run = Run(state if in_place else state.model_copy(deep=True), definition.workflow, now_ms, self.max_state_bytes, self.default_retention_s, self.limit, claims=self._claims())
        run.redrive()
        run.drain()
        run.stop_for_budget()
        run.enforce_size()
        return Decision(run.state, run.out, run.events)

    def _fork(self, state: RunState | None, event: RunForkRequested) -> Decision:
        """A fork of the source run ``state`` (any status): its seed goes to the new run's partition; the source is unchanged."""
        if state is None:
            seed: RunForkAccepted | str = f"no run {event.run_id!r} (unknown, or forgotten after its retention)"
        else:
            definition = self.pinned(state)
            seed = fork_seed(state, definition, event) if definition is not None else self._gone(state) + ": it cannot be forked"
        if isinstance(seed, str):
            return Decision(state, [EventIgnored(run_id=event.run_id, reason="fork_refused", detail=seed)], [])
        return Decision(state, [StartForkedRun(seed=seed)], [])

    def _start_forked(self, seed: RunForkAccepted, now_ms: int) -> Decision:
        """A forked run starts with the steps before the fork point already finished as they were, and runs from it on."""
        definition = self.definitions().get(seed.workflow, seed.version)
        state = RunState(schema_version=SCHEMA_VERSION, run_id=seed.run_id, workflow=seed.workflow, version=seed.version, sha256=seed.sha256,
                         input=seed.input, correlation_id=seed.correlation_id, started_ms=now_ms, forked_from=dict(seed.forked_from))
        wf = definition.workflow if definition is not None and definition.sha256 == seed.sha256 else None
        run = Run(state, wf, now_ms, self.max_state_bytes, self.default_retention_s, self.limit, claims=self._claims())
        if wf is None:
            run.finish_run(False, None, ErrorInfo(type="DefinitionChanged", message=self._gone(state), retryable=False))
            return Decision(run.state, run.out, run.events)
        root = Frame(id="root", ref="root")
        top = [step.id for step in wf.sequences["root"]]
        for forked in seed.steps:
            state.view[forked.step_id] = {"output": forked.output, "status": forked.status, "confidence": forked.confidence, "attempt": 0, "cached": forked.cached}
            if forked.step_id not in top:
                continue  # nested: only what CEL sees as steps.<id>
            step = StepState(key=forked.step_id, step_id=forked.step_id, kind=step_kind(wf.steps[forked.step_id]), frame="root", status=forked.status,
                             output=forked.output, confidence=forked.confidence, cached=forked.cached, cost=forked.cost, path=forked.path,
                             started_ms=now_ms, finished_ms=now_ms)
            state.steps[step.key] = step
            root.step_keys.append(step.key)
            if forked.cost:
                run.add_copied_cost(forked.cost)
            if forked.path:
                state.path.append(f"{forked.step_id}:{forked.path}")
            root.last_output, root.last_confidence = forked.output, forked.confidence
        root.index = top.index(seed.forked_from["step"])
        state.frames["root"] = root
        run.publish("run.started")
        if wf.definition.timeout is not None:
            run.set_timer(keys.RUN_TIMEOUT, wf.definition.timeout, "run_timeout")
        run.advance("root")
        run.drain()
        run.enforce_size()
        return Decision(run.state, run.out, run.events)

    @staticmethod
    def _gone(state: RunState) -> str:
        pin = f"workflow {state.workflow!r} v{state.version}" + (f" (sha256 {state.sha256[:12]})" if state.sha256 else "")
        return f"{pin} is no longer deployed as the run started it"


def _retention_over(state: RunState, timer_id: str) -> bool:
    """Whether ``timer_id`` is the finished run's retention timer, or ``run:retention`` for a state that finished before
    runs had one (the shell fires it for them)."""
    timer = state.timers.get(timer_id)
    if timer is not None:
        return timer.kind == "retention"
    return timer_id == keys.RUN_RETENTION and not any(t.kind == "retention" for t in state.timers.values())


def redrive_target(state: RunState, definition: Definition | None) -> StepState | str:
    """The top-level step a failed run stopped at, when a redrive can resume it; else why not (a named guard, also
    applied by ``legato redrive --wait`` to the stored run). ``definition``: the one the run is pinned to.

    The guard walks down what ``Run.redrive`` would resume (fallback steps that failed, the frames of compound steps
    that failed or were cancelled, ``Processor.redrive_frames``) and refuses when any part of it would fail the same
    way again or cannot be resumed."""
    if definition is None:
        return Machine._gone(state) + ": it cannot be redriven"
    root = state.frames["root"]
    sequence = definition.workflow.sequences["root"]
    error = state.error.type if state.error else "failed"
    if root.index >= len(sequence):
        return f"the run failed after its last step ({error}): trigger it again"
    if error == "ContextTooLarge" and root.status == "cancelled":
        return "the run's state outgrew its limit and its outputs were shed: trigger it again"
    step = state.steps.get(keys.step_key("root", sequence[root.index].id))
    if step is None or step.status in ("succeeded", "skipped"):
        return f"the run failed between steps ({error}): trigger it again"
    return _step_refusal(state, definition.workflow, step) or step


def _step_refusal(state: RunState, wf: CompiledWorkflow, step: StepState) -> str | None:
    """Why ``step``, where a frame of the failed run stopped, cannot run again (``Run.redrive_step``), or None."""
    fallback = state.frames.get(keys.fallback_frame(step.key))
    if fallback is not None:
        return _frame_refusal(state, wf, fallback)
    if _failed_on_own_expression(step):
        return f"step {step.key!r} failed on an expression ({step.error.message}): it would fail the same way again: trigger the run again"
    frames = processor(step.kind).redrive_frames(state, step, wf.steps[step.step_id])
    if isinstance(frames, str):
        return frames
    return next((refusal for frame in frames if (refusal := _frame_refusal(state, wf, frame)) is not None), None)


def _failed_on_own_expression(step: StepState) -> bool:
    """Whether ``step`` failed on one of its own expressions (its input, a map's ``items``, a choice's condition), which
    read the same values again. Not a compound step's (a step inside it failed) nor a child run's (a fresh child run
    may see other outputs)."""
    if step.error is None or step.error.type != "ExpressionError" or step.children:
        return False
    return not (step.kind == "workflow" and step.child_run is not None)


def _frame_refusal(state: RunState, wf: CompiledWorkflow, frame: Frame) -> str | None:
    """Why ``frame`` cannot be resumed from the step it stopped at (``Run.resume_frame``), or None."""
    sequence = wf.sequences[frame.ref]
    if frame.index >= len(sequence):
        return None  # it ends at once
    step = state.steps.get(keys.step_key(frame.id, sequence[frame.index].id))
    if step is None:
        return None  # it starts the step it never started
    if step.status in ("succeeded", "skipped"):
        return f"step {step.key!r} {step.status} but its frame did not go on: trigger the run again"
    return _step_refusal(state, wf, step)


def _unknown(catalog: Catalog, event: RunAccepted) -> str:
    versions = [str(d.version) for d in catalog if d.name == event.workflow]
    if event.version is not None and versions:
        return f"workflow {event.workflow!r} has no version {event.version} (deployed: {', '.join(versions)})"
    return f"no workflow named {event.workflow!r} (deployed: {', '.join(catalog.names()) or 'none'})"


_activities: ActivityProcessor = processor("activity")  # type: ignore[assignment]
_subworkflows: SubWorkflowProcessor = processor("workflow")  # type: ignore[assignment]
_waits: WaitProcessor = processor("wait")  # type: ignore[assignment]


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
    out.extend(run_limits.outstanding_acquisitions(state))
    for timer_id, timer in state.timers.items():
        out.append(StartTimer(run_id=state.run_id, timer_id=timer_id, due_ms=timer.due_ms))
    if state.finished:
        out.append(PublishRunEvent(event=terminal_event(state), completion_topic=completion_topic))
        if parent_waits(state):
            out.append(NotifyParent(finished=child_finished(state)))
    return out


def replay(machine: Machine, events: Iterable[tuple[Event, int]]) -> tuple[RunState | None, list[Command]]:
    """Fold ``(event, now_ms)`` pairs through ``machine``; for golden-log and determinism tests."""
    state: RunState | None = None
    commands: list[Command] = []
    for event, now in events:
        state, out = machine.decide(state, event, now)
        commands.extend(out)
    return state, commands


def _abandoned_child(step: StepState) -> bool:
    """Whether a sub-workflow step stopped waiting for its child run (a lost race, a timeout, a finished run)."""
    timed_out = step.error is not None and step.error.type == "ChildRunTimeout"
    return step.kind == "workflow" and step.child_run is not None and (step.status in ("cancelled", "timed_out") or timed_out)


def _signal_ignored(event: Event, workflow: str, reason: str) -> list[DomainEvent]:
    if isinstance(event, SignalSent):
        return [SignalIgnored(run_id=event.run_id, workflow=workflow, signal=event.signal, reason=reason)]
    return []


def _describe(event: Event) -> str:
    if isinstance(event, (ActivityCompleted, ActivityStarted, ActivityHeartbeat)):
        return f"request {event.request_id} attempt {event.attempt}"
    if isinstance(event, TimerFired):
        return f"timer {event.timer_id}"
    if isinstance(event, ChildRunFinished):
        return f"child run {event.child_run_id}"
    if isinstance(event, RunCancelRequested):
        return f"cancellation requested by {event.requested_by or 'a user'}: {event.reason}"
    if isinstance(event, SignalSent):
        return f"signal {event.signal!r}" + (f" id {event.signal_id!r}" if event.signal_id else "")
    return ""


def _payload_entries(run_id: str, output: Any) -> list[dict]:
    """The payloads ``output`` refers to that are stored under ``run_id`` (``<run_id>/…``), as
    ``RunState.unused_payloads`` lists them: only those are the run's to delete."""
    entries: list[dict] = []
    seen: set[str] = set()
    for ref in refs_in(output):
        if ref.id.startswith(run_id + "/") and ref.id not in seen:
            seen.add(ref.id)
            entry = {"id": ref.id, "size": ref.size, "sha256": ref.sha256}
            entry.update({k: v for k, v in (("partition", ref.partition), ("chunks", ref.chunks)) if v is not None})
            entries.append(entry)
    return entries


def _forget_orphan_payloads(decision: Decision, run_id: str, entries: list[dict]) -> Decision:
    """A completion for a run the coordinator does not know: its retention is over (or it never was), so no attempt
    under its id can be accepted and no state will list what the worker stored for it; deleted now. (A run started
    again under the same id comes later on this partition, so its own payloads are stored after these tombstones.)"""
    return Decision(None, [*decision.commands, ForgetPayloads(run_id=run_id, payloads=_unique(entries))], decision.events)


def _unique(entries: list[dict]) -> list[dict]:
    seen: set[str] = set()
    return [e for e in entries if not (e["id"] in seen or seen.add(e["id"]))]


def _keep_unused_payloads(decision: Decision, entries: list[dict], *, copy: bool) -> Decision:
    """Payloads stored under this run's id that its state will not refer to (an ignored completion's output: a stale
    attempt, a duplicate, a late answer to a finished run; or an attempt's progress chunks): the state lists them
    (``unused_payloads``, not references, so never fetched), so the run's retention deletes them too. Listed once
    each; payloads of other runs are not this run's to delete (``entries`` holds this run's only)."""
    state = decision.state
    assert state is not None
    listed = {p["id"] for p in state.unused_payloads}
    new = [e for e in _unique(entries) if e["id"] not in listed]
    if not new:
        return decision
    if copy:
        state = state.model_copy(deep=True)
    for entry in new:
        state.unused_payloads.append(entry)
        state.size_hint += 200
    return Decision(state, [*decision.commands, KeepUnusedPayloads(run_id=state.run_id, payload_ids=[e["id"] for e in new])], decision.events)
