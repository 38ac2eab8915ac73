"""Records on the wire, one frozen pydantic model each.

Events are named for what happened; the topic they travel on is in docs/concepts/topics.md.
Times are Unix epoch milliseconds (``*_ms``) or ISO-8601 UTC strings (``*_at``).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class RunRequested(_Record):
    """A trigger on ``legato.triggers``: start ``workflow`` with ``input``."""

    workflow: str = Field(min_length=1, max_length=200)
    input: dict[str, Any] = Field(default_factory=dict)
    run_id: str | None = Field(default=None, min_length=1, max_length=200)
    correlation_id: str | None = Field(default=None, max_length=200)
    parent: dict[str, Any] | None = None  # set for sub-workflow runs: {run_id, step_key}
    version: int | None = Field(default=None, ge=1)  # the definition's version to run; None: the highest deployed
    priority: int | None = Field(default=None, ge=1, le=5)  # 1 (lowest) to 5 for the limits its steps wait for; None: 3


class Cost(_Record):
    usd: float | None = Field(default=None, ge=0)
    tokens_in: int | None = Field(default=None, ge=0)
    tokens_out: int | None = Field(default=None, ge=0)
    model: str | None = None


class ErrorInfo(_Record):
    type: str
    message: str = ""
    retryable: bool = True
    retry_after_ms: int | None = Field(default=None, ge=0)  # type ``RateLimited``: the next attempt no sooner than this


class ActivityRequested(_Record):
    """On ``legato.requests.<activity>``: what a worker of that activity consumes."""

    request_id: str
    run_id: str
    step_id: str
    activity: str
    attempt: int = Field(ge=1)
    input: Any = None
    deadline: int | None = None  # epoch ms after which the coordinator no longer waits
    workflow: str | None = None
    requested_ms: int | None = None  # epoch ms when the coordinator decided it (queue-time metric)
    run_started_ms: int | None = None  # epoch ms its run started: with request_id, the request's identity across a run_id reused after retention
    cache_ttl_ms: int | None = None  # answer from the result cache when an identical request succeeded within it
    batch: dict[str, Any] | None = None  # {max_size, max_wait_ms}: the handler may take several requests at once
    rate_limit: float | None = None  # requests per second per worker process
    report_started: bool | None = None  # the step watches its handler's start: send ``activity.started`` when it starts
    heartbeat_ms: int | None = Field(default=None, gt=0)  # the step expects ``activity.heartbeat`` at least this often


class StoredPayload(_Record):
    """A payload a worker stored under the run's id that no field of the record refers to (not a reference, so never
    fetched): the run's retention deletes it with the rest (docs/payloads.md)."""

    id: str = Field(min_length=1)
    size: int = Field(ge=0)
    sha256: str
    partition: int | None = None
    chunks: int | None = None


class ActivityCompleted(_Record):
    """On ``legato.completions``: what a worker emits for one request."""

    request_id: str
    run_id: str
    step_id: str
    attempt: int = Field(ge=1)
    status: Literal["succeeded", "failed"]
    output: Any = None
    confidence: float | None = Field(default=None, ge=0, le=1)
    cost: Cost | None = None
    error: ErrorInfo | None = None
    cached: bool | None = None  # answered from the result cache
    progress_payloads: list[StoredPayload] | None = None  # progress chunks of this attempt stored by reference


def _type_required(schema: dict[str, Any]) -> None:
    """In the published schema, ``type`` is required: on ``legato.completions`` a record without one is a completion."""
    schema["required"] = ["type", *schema.get("required", [])]


class ActivityStarted(_Record):
    """On ``legato.completions``, keyed by run_id: a worker's handler started on one request (Legato's workers send it
    when the request asks, ``report_started``; optional for independent workers). It starts the step's
    ``run_timeout`` and ``heartbeat`` clocks and stops its ``start_timeout``; it never completes the step."""

    model_config = ConfigDict(frozen=True, extra="ignore", json_schema_extra=_type_required)

    type: Literal["activity.started"] = "activity.started"
    request_id: str
    run_id: str
    step_id: str
    attempt: int = Field(ge=1)
    started_ms: int  # epoch ms when the handler started


class ActivityHeartbeat(_Record):
    """On ``legato.completions``, keyed by run_id: a running handler is alive (``await heartbeat()``). Each one re-arms
    the step's ``heartbeat`` timer; one for a handler not yet known to have started also counts as its start."""

    model_config = ConfigDict(frozen=True, extra="ignore", json_schema_extra=_type_required)

    type: Literal["activity.heartbeat"] = "activity.heartbeat"
    request_id: str
    run_id: str
    step_id: str
    attempt: int = Field(ge=1)
    heartbeat_ms: int  # epoch ms when the handler reported it


class CachedResult(_Record):
    """On the compacted ``legato.cache``, keyed by the request's fingerprint (``legato.topics.cache``): the result
    of a ``cache: {ttl}`` step, written by the coordinator when it decides the step's successful completion (and by
    Legato's own workers). It answers an identical request while ``stored_ms`` + the step's ttl is in the future."""

    output: Any = None
    confidence: float | None = Field(default=None, ge=0, le=1)
    stored_ms: int


class RequestCancelled(_Record):
    """On ``legato.cancellations``: the coordinator no longer waits for this request (a lost race, a failed
    sibling, a finished run). Workers skip it when still queued and cancel it when running."""

    type: Literal["request.cancelled"] = "request.cancelled"
    request_id: str
    run_id: str
    activity: str
    reason: str = ""


class ForkedFrom(TypedDict):
    """Where a forked run came from: the source run and the step it was forked from (a plain dict on the wire)."""

    run_id: str
    step: str


class RunEvent(_Record):
    """On ``legato.runs`` (and a workflow's own ``completion_topic``): a run's lifecycle."""

    type: Literal["run.started", "run.redriven", "run.completed", "run.failed", "run.cancelled"]
    run_id: str
    workflow: str
    status: Literal["running", "succeeded", "failed", "cancelled"]
    output: Any = None
    error: ErrorInfo | None = None
    started_at: str
    finished_at: str | None = None
    duration_ms: int | None = None
    correlation_id: str | None = None
    path: list[str] | None = None  # branches taken by choice steps, e.g. ["route:default"]
    cost: dict[str, Any] | None = None
    stopped_by: Literal["budget"] | None = None  # the run went over its budget (on_budget: finish) and ended with what it had
    confidence: float | None = None  # a succeeded run's: its last step's (a parallel or map: its aggregate)
    version: int | None = None  # the version of the definition the run is pinned to (run.started and terminal events)
    redrives: int | None = None  # set once the run was redriven: how many times (run.redriven and later terminal events)
    forked_from: ForkedFrom | None = None  # a forked run's source (run.started and terminal events)


class DeadLetter(_Record):
    """On ``legato.dlq``: a message that could not be processed, with the reason."""

    source_topic: str
    partition: int
    offset: int
    reason: str
    payload: str
    key: str | None = None


# --- internal: the coordinator topic -------------------------------------------------------------


class RunAccepted(_Record):
    """A trigger re-keyed by its run_id onto the coordinator topic."""

    type: Literal["run.accepted"] = "run.accepted"
    run_id: str
    workflow: str
    input: dict[str, Any] = Field(default_factory=dict)
    correlation_id: str | None = None
    parent: dict[str, Any] | None = None
    version: int | None = Field(default=None, ge=1)  # None: the highest deployed when this record is decided
    priority: int | None = Field(default=None, ge=1, le=5)
    triggered_ms: int | None = None  # the trigger record's timestamp: runs of a concurrency key start in this order


class ChildRunFinished(_Record):
    """A sub-workflow's child run ended; keyed by the parent's run_id."""

    type: Literal["child.finished"] = "child.finished"
    run_id: str  # the parent run
    step_key: str
    child_run_id: str
    status: Literal["succeeded", "failed"]
    output: Any = None
    error: ErrorInfo | None = None
    cost: dict[str, Any] | None = None


class TimerFired(_Record):
    """A timer that the coordinator set for a run came due."""

    type: Literal["timer.fired"] = "timer.fired"
    run_id: str
    timer_id: str
    completions_offset: int | None = None
    """The end of the run's partition of the completions topic when the timer fired: the coordinator decides the
    timer only after every completion before that offset, so an answer in the log before a deadline always wins
    over the deadline's timer, also when a new owner reads both again after a crash."""


class RunCancelRequested(_Record):
    """Stop a run; keyed by its run_id. A parent sends it for a child run it no longer waits for; a user may
    produce it to cancel any run. The run cancels what it waits for (its own child runs too) and ends cancelled."""

    type: Literal["run.cancel_requested"] = "run.cancel_requested"
    run_id: str = Field(min_length=1)  # the run to stop
    reason: str = Field(default="", max_length=1000)
    requested_by: str | None = None  # the parent's run_id when a parent stopped its child; None for a user


class SignalSent(_Record):
    """Someone (a person, a webhook, another system) sent a run a named signal; keyed by the run_id, on
    ``legato.signals``. It completes the oldest ``wait`` step of that run waiting on ``signal``, or is kept by the
    run until one starts. A repeated ``signal_id`` for the same run is ignored (and counted)."""

    run_id: str = Field(min_length=1, max_length=200)
    signal: str = Field(min_length=1, max_length=200)
    data: Any = None
    signal_id: str | None = Field(default=None, min_length=1, max_length=200)


class ProgressReported(_Record):
    """A partial result of a running step (e.g. tokens of an LLM answer), on ``legato.progress``, keyed by run_id.
    ``seq`` counts from 0 within one request. Never part of the run's state."""

    run_id: str = Field(min_length=1)
    step_id: str
    request_id: str
    seq: int = Field(ge=0)
    chunk: Any = None


class DefinitionDeployed(_Record):
    """A workflow definition published to the compacted ``legato.definitions`` topic, keyed ``<name>@<version>``."""

    name: str = Field(min_length=1, max_length=200)
    version: int = Field(ge=1)
    sha256: str = Field(min_length=64, max_length=64)
    source: str  # the YAML text
    deployed_at: str  # RFC 3339


# --- run lifecycle: redrive and fork (issue 11; handled by the coordinator once integrated) ----------


class RunRedriveRequested(_Record):
    """Resume a failed run; keyed by its run_id, on the coordinator topic (a user may produce it, like a cancel).
    Every step that failed, timed out or was cancelled by the failure runs again with attempt numbers that continue;
    steps that succeeded keep their outputs. A run that is not failed (running, succeeded, cancelled, unknown or
    forgotten after its retention) is left as it is, and the refusal counted."""

    type: Literal["run.redrive_requested"] = "run.redrive_requested"
    run_id: str = Field(min_length=1, max_length=200)
    reason: str = Field(default="", max_length=1000)


class RunForkRequested(_Record):
    """Start a new run of a run's pinned definition from one of its top-level steps; keyed by the SOURCE run_id, on
    the coordinator topic, so the partition that holds the source run copies what finished before ``from_step``.
    ``new_run_id`` is the new run's idempotency key (a repeated request starts nothing new)."""

    type: Literal["run.fork_requested"] = "run.fork_requested"
    run_id: str = Field(min_length=1, max_length=200)  # the source run
    from_step: str = Field(min_length=1, max_length=100)
    new_run_id: str = Field(min_length=1, max_length=200)
    input: dict[str, Any] | None = None  # None: the source run's input
    reason: str = Field(default="", max_length=1000)


class ForkedStep(_Record):
    """A step that finished before the fork point in the source run, copied into the forked run as it ended."""

    step_id: str
    status: Literal["succeeded", "skipped", "failed", "timed_out"]  # failed ones let the run go on (on_error)
    output: Any = None
    confidence: float | None = None
    cached: bool = False
    cost: dict[str, Any] | None = None
    path: str | None = None  # the case or route a choice step took


class RunForkAccepted(_Record):
    """Internal: the seed of a forked run, sent by the source run's partition to the new run's (keyed by the new
    run_id). The new run is pinned to the source's definition, starts with ``steps`` already finished, and runs
    from ``from_step`` on."""

    type: Literal["run.fork_accepted"] = "run.fork_accepted"
    run_id: str  # the new run
    workflow: str
    version: int = Field(ge=1)
    sha256: str = Field(min_length=64, max_length=64)
    input: dict[str, Any] = Field(default_factory=dict)
    correlation_id: str | None = None
    forked_from: ForkedFrom
    steps: list[ForkedStep] = Field(default_factory=list)  # in the order they ran
