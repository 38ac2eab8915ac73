"""A run's state, as stored in the coordinator's run table (one JSON document per run_id)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from legato.topics.models import ErrorInfo

TERMINAL = ("succeeded", "failed", "cancelled")


class _State(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StepState(_State):
    """One execution of a step inside one frame (a loop iteration runs its steps again)."""

    key: str
    step_id: str
    kind: str
    frame: str
    status: str = "running"  # running | waiting_retry | succeeded | failed | timed_out | cancelled | skipped
    attempt: int = 0
    request_id: str | None = None
    request: dict[str, Any] | None = None  # the pending ActivityRequested, to resend after a crash
    output: Any = None
    confidence: float | None = None
    error: ErrorInfo | None = None
    started_ms: int = 0
    finished_ms: int | None = None
    iteration: int | None = None
    children: list[str] = Field(default_factory=list)  # frame ids of a compound step
    path: str | None = None  # the case or route a choice took
    ended_by: str | None = None  # how a loop ended: until | max_iterations | items | timeout | no_progress | budget | failed
    cached: bool = False  # the output came from the result cache
    child_run: str | None = None  # run_id of a sub-workflow step's child run
    # fan-out (parallel, map): results by branch name / item index, counters, the next item to start
    results: dict[str, Any] = Field(default_factory=dict)
    succeeded_n: int = 0
    failed_n: int = 0
    done_n: int = 0
    total: int = 0
    next_index: int = 0
    items: list[Any] | None = None  # a map's items or a for_each loop's list
    unchanged: int = 0  # a loop's iterations in a row whose output did not change (no_progress)
    cost: dict[str, Any] | None = None


class Frame(_State):
    """A sequence of steps being executed: the root, a branch, a choice path or a loop iteration."""

    id: str
    ref: str  # key of CompiledWorkflow.sequences
    owner: str | None = None  # key of the compound step that started it (None for the root)
    index: int = 0
    status: str = "running"  # running | succeeded | failed | cancelled
    last_output: Any = None
    error: ErrorInfo | None = None
    scope: dict[str, Any] = Field(default_factory=dict)  # iteration, previous, item, index
    name: str | None = None  # branch name or item index within its fan-out step
    attempt: int = 1  # a parallel branch restarted by on_failure: retry
    step_keys: list[str] = Field(default_factory=list)  # steps started in this frame (to drop finished map items)


class Timer(_State):
    due_ms: int
    kind: str  # activity_timeout | retry | run_timeout | loop_timeout
    target: str | None = None  # step key
    attempt: int | None = None


class RunState(_State):
    run_id: str
    workflow: str
    version: int
    status: str = "running"  # running | succeeded | failed | cancelled
    input: dict[str, Any] = Field(default_factory=dict)
    correlation_id: str | None = None
    parent: dict[str, Any] | None = None
    started_ms: int
    finished_ms: int | None = None
    output: Any = None
    error: ErrorInfo | None = None
    frames: dict[str, Frame] = Field(default_factory=dict)
    steps: dict[str, StepState] = Field(default_factory=dict)
    view: dict[str, dict[str, Any]] = Field(default_factory=dict)  # CEL `steps`: latest result by step id
    requests: dict[str, str] = Field(default_factory=dict)  # pending request_id -> step key
    timers: dict[str, Timer] = Field(default_factory=dict)
    path: list[str] = Field(default_factory=list)
    cost: dict[str, Any] = Field(default_factory=dict)
    cursor: dict[str, int] = Field(default_factory=dict)  # the shell's last applied offset per source partition
    depth: int = 0  # sub-workflow nesting
    budget_exhausted: bool = False
    cancelled_by: str | None = None  # who cancelled the run (RunCancelRequested.requested_by): its parent needs no notice
    size_hint: int = 0  # an upper estimate of this document's JSON size, re-measured near the limit

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL
