"""Helpers for driving the pure state machine (workflows/machine.py) in tests.

Time is always an explicit integer of epoch milliseconds passed in by the test: nothing here sleeps or reads
a clock. ``Harness`` keeps one run's state, every delivered ``(event, now_ms)`` and every command, so a test can
replay the log, re-deliver an event, or assert on what was emitted.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Iterable

import yaml

from legato.topics.models import ActivityCompleted, ActivityRequested, Cost, ErrorInfo, RunAccepted, TimerFired
from legato.workflows.machine import (
    Command,
    Event,
    EventIgnored,
    Machine,
    PublishRunEvent,
    RequestActivity,
    StartTimer,
)
from legato.workflows.catalog import Catalog, Definition, source_sha256
from legato.workflows.model import CompiledWorkflow, compile_workflow, load_workflow
from legato.workflows.state import RunState

EXAMPLES = Path(__file__).resolve().parent.parent / "workflows" / "examples"
T0 = 1_700_000_000_000
"""A fixed start time (epoch ms) for tests that do not care about the exact instant."""


# --- definitions ----------------------------------------------------------------------------------


def compile_yaml(text: str, file: str = "<test>") -> CompiledWorkflow:
    """Parse an inline YAML document (dedented) and compile it; raises DefinitionError."""
    return compile_workflow(yaml.safe_load(textwrap.dedent(text)), file)


def machine_from(*texts: str) -> Machine:
    """A Machine knowing the workflows written in ``texts`` (inline YAML, one document each)."""
    return Machine(catalog_from(*texts))


def catalog_from(*texts: str) -> Catalog:
    """The catalog of the workflows in ``texts``, each hashed from its text as ``legato deploy`` does."""
    return Catalog.of([Definition(compile_yaml(t), source_sha256(t)) for t in texts])


def example(name: str) -> CompiledWorkflow:
    """A workflow from workflows/examples, e.g. ``example("support_triage")``."""
    return load_workflow(EXAMPLES / f"{name}.yaml")


# --- events ---------------------------------------------------------------------------------------


def accepted(workflow: str, input: dict[str, Any] | None = None, run_id: str = "r1", **kw: Any) -> RunAccepted:
    return RunAccepted(run_id=run_id, workflow=workflow, input=input or {}, **kw)


def succeeded(
    request: ActivityRequested,
    output: Any = None,
    confidence: float | None = None,
    cost: dict[str, Any] | None = None,
    attempt: int | None = None,
) -> ActivityCompleted:
    """A worker's success for ``request`` (``attempt`` overrides the request's own, for stale tests)."""
    return ActivityCompleted(
        request_id=request.request_id,
        run_id=request.run_id,
        step_id=request.step_id,
        attempt=attempt or request.attempt,
        status="succeeded",
        output=output,
        confidence=confidence,
        cost=Cost(**cost) if cost else None,
    )


def failed(
    request: ActivityRequested,
    error_type: str = "Boom",
    retryable: bool = True,
    message: str = "it broke",
    attempt: int | None = None,
) -> ActivityCompleted:
    """A worker's failure for ``request`` with an ErrorInfo."""
    return ActivityCompleted(
        request_id=request.request_id,
        run_id=request.run_id,
        step_id=request.step_id,
        attempt=attempt or request.attempt,
        status="failed",
        error=ErrorInfo(type=error_type, message=message, retryable=retryable),
    )


def fired(run_id: str, timer_id: str) -> TimerFired:
    return TimerFired(run_id=run_id, timer_id=timer_id)


# --- reading commands and state -------------------------------------------------------------------


def requests_in(commands: Iterable[Command]) -> list[ActivityRequested]:
    """The ActivityRequested records carried by RequestActivity commands, in order."""
    return [c.request for c in commands if isinstance(c, RequestActivity)]


def timers_in(commands: Iterable[Command]) -> list[StartTimer]:
    return [c for c in commands if isinstance(c, StartTimer)]


def run_events_in(commands: Iterable[Command]) -> list[PublishRunEvent]:
    return [c for c in commands if isinstance(c, PublishRunEvent)]


def terminal_events_in(commands: Iterable[Command]) -> list[PublishRunEvent]:
    return [c for c in commands if isinstance(c, PublishRunEvent) and c.event.type in ("run.completed", "run.failed", "run.cancelled")]


def ignored_in(commands: Iterable[Command]) -> list[EventIgnored]:
    return [c for c in commands if isinstance(c, EventIgnored)]


def pending_requests(state: RunState | None) -> list[ActivityRequested]:
    """The requests the run is waiting on, from ``state.requests`` (in insertion order)."""
    if state is None:
        return []
    return [ActivityRequested.model_validate(state.steps[key].request) for key in state.requests.values()]


def dump(state: RunState | None) -> Any:
    return None if state is None else state.model_dump(mode="json")


# --- a run under test -----------------------------------------------------------------------------


class Harness:
    """One run: feeds events to ``machine`` at explicit times and records everything."""

    def __init__(self, machine: Machine, run_id: str = "r1"):
        self.machine = machine
        self.run_id = run_id
        self.state: RunState | None = None
        self.now = T0
        self.log: list[tuple[Event, int]] = []
        self.commands: list[Command] = []
        self.last: list[Command] = []

    # when ...

    def deliver(self, event: Event, now: int | None = None) -> list[Command]:
        if now is not None:
            self.now = now
        self.state, self.last = self.machine.decide(self.state, event, self.now)
        self.log.append((event, self.now))
        self.commands.extend(self.last)
        return self.last

    def start(self, workflow: str, input: dict[str, Any] | None = None, now: int | None = None, **kw: Any) -> list[Command]:
        return self.deliver(accepted(workflow, input, run_id=self.run_id, **kw), now)

    def succeed(self, request: ActivityRequested | str, output: Any = None, now: int | None = None, **kw: Any) -> list[Command]:
        return self.deliver(succeeded(self._request(request), output, **kw), now)

    def fail(self, request: ActivityRequested | str, error_type: str = "Boom", retryable: bool = True, now: int | None = None, **kw: Any) -> list[Command]:
        return self.deliver(failed(self._request(request), error_type, retryable, **kw), now)

    def fire(self, timer_id: str, now: int | None = None) -> list[Command]:
        """Fire a pending timer, at its due time unless ``now`` is given."""
        if now is None:
            assert self.state is not None and timer_id in self.state.timers, f"timer {timer_id} is not pending"
            now = self.state.timers[timer_id].due_ms
        return self.deliver(fired(self.run_id, timer_id), now)

    # then ...

    def pending(self) -> list[ActivityRequested]:
        return pending_requests(self.state)

    def pending_for(self, step_id: str) -> ActivityRequested:
        """The single pending request of ``step_id``."""
        found = [r for r in self.pending() if r.step_id == step_id]
        assert len(found) == 1, f"expected one pending request for {step_id}, got {[r.request_id for r in self.pending()]}"
        return found[0]

    def pending_steps(self) -> list[str]:
        return sorted(r.step_id for r in self.pending())

    def _request(self, request: ActivityRequested | str) -> ActivityRequested:
        return self.pending_for(request) if isinstance(request, str) else request

    @property
    def status(self) -> str | None:
        return None if self.state is None else self.state.status

    def terminal(self) -> PublishRunEvent:
        """The single terminal run event emitted so far."""
        found = terminal_events_in(self.commands)
        assert len(found) == 1, f"expected exactly one terminal run event, got {len(found)}"
        return found[0]
