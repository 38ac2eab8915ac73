"""A run's state, as stored in the coordinator's run table (one JSON document per run_id)."""
from __future__ import annotations

from typing import Any, Literal

import msgspec
from pydantic import BaseModel

from legato.topics.models import ErrorInfo

StepStatus = Literal["running", "waiting", "waiting_retry", "succeeded", "failed", "timed_out", "cancelled", "skipped"]
"""``waiting``: a ``wait`` step waiting for its signal. ``waiting_retry``: an activity between attempts."""
FrameStatus = Literal["running", "succeeded", "failed", "cancelled"]
RunStatus = Literal["running", "succeeded", "failed", "cancelled"]
TimerKind = Literal["activity_timeout", "activity_start_timeout", "activity_run_timeout", "activity_heartbeat", "retry", "run_timeout", "loop_timeout", "join_timeout", "wait_timeout", "sleep", "retention"]

TERMINAL: tuple[RunStatus, ...] = ("succeeded", "failed", "cancelled")
STEP_FINISHED: tuple[StepStatus, ...] = ("succeeded", "failed", "timed_out", "cancelled", "skipped")

SCHEMA_VERSION = 2
"""The version of the stored ``RunState``. The run table stores states without their defaults, so a changed
default would silently change what a stored run means: a change of meaning bumps this and adds an upgrade to
``RunState._upgrade``. A state stored without ``schema_version`` is version 1 (before waits and signals: a
version 1 state reads the same as version 2)."""

MAX_PENDING_SIGNALS = 64
"""Signals a run keeps for a ``wait`` that has not started yet; past that a signal is refused (dead-lettered)."""

MAX_SIGNAL_IDS = 1024
"""``signal_id``s a run remembers to drop repeats (the oldest are forgotten first)."""


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, BaseModel):  # a record's ErrorInfo, held as it came
        return obj.model_dump(mode="json", exclude_defaults=True)
    raise NotImplementedError(f"a run state cannot hold a {type(obj).__name__}")


def _dec_hook(kind: Any, obj: Any) -> Any:
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return kind.model_validate(obj)
    raise NotImplementedError(f"a run state has no {kind!r}")


_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)
_DECODERS: dict[type, msgspec.json.Decoder] = {}


def _plain(value: Any) -> Any:
    """``value`` as JSON-like builtins with every field of every state object (the defaults too)."""
    if isinstance(value, _State):
        return {name: _plain(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _State(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A part of a run's state: a msgspec struct (pydantic models cost 23 µs to encode and 54 µs to decode a 20-step
    run's 4.9 KB state, msgspec 3.8 and 10.9 µs, with the same bytes; BENCHMARKS.md, "Run states: msgspec"). Its JSON leaves
    defaults out, as the run table stores it; unknown fields are ignored (a state from a newer engine that only
    added fields still reads). The ``model_*`` methods are the pydantic names the rest of Legato and its tools use."""

    @classmethod
    def model_validate_json(cls, raw: bytes | str) -> Any:
        decoder = _DECODERS.get(cls)
        if decoder is None:
            decoder = _DECODERS[cls] = msgspec.json.Decoder(cls, dec_hook=_dec_hook)
        return decoder.decode(raw)

    @classmethod
    def model_validate(cls, data: Any) -> Any:
        return data if isinstance(data, cls) else msgspec.convert(data, cls, dec_hook=_dec_hook)

    def encoded(self) -> bytes:
        """The stored document: JSON without the fields at their defaults."""
        return _ENCODER.encode(self)

    def model_dump_json(self, *, exclude_defaults: bool = True) -> str:
        """The stored document as text (``exclude_defaults=False``: every field, as ``model_dump`` gives them)."""
        if exclude_defaults:
            return _ENCODER.encode(self).decode()
        return msgspec.json.encode(_plain(self)).decode()

    def model_dump(self, *, mode: str = "python", exclude: set[str] | None = None, exclude_defaults: bool = False) -> dict[str, Any]:
        """Builtins of every field (``exclude_defaults``: of those not at their defaults, as stored)."""
        data = msgspec.json.decode(_ENCODER.encode(self)) if exclude_defaults else _plain(self)
        for name in exclude or ():
            data.pop(name, None)
        return data

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Any:
        copy = type(self).model_validate_json(_ENCODER.encode(self)) if deep else msgspec.structs.replace(self)
        return msgspec.structs.replace(copy, **update) if update else copy


class StepState(_State, kw_only=True):
    """One execution of a step inside one frame (a loop iteration runs its steps again)."""

    key: str
    step_id: str
    kind: str
    frame: str
    status: StepStatus = "running"  # changed only by legato.workflows.transitions
    attempt: int = 0
    request_id: str | None = None
    request: dict[str, Any] | None = None  # the pending ActivityRequested, to resend after a crash
    handler_started_ms: int | None = None  # when the handler of the current attempt started (activity.started), if known
    heartbeats: int = 0  # heartbeats decided for the current attempt (names its heartbeat timer)
    output: Any = None
    confidence: float | None = None
    error: ErrorInfo | None = None
    started_ms: int = 0
    finished_ms: int | None = None
    iteration: int | None = None
    children: list[str] = msgspec.field(default_factory=list)  # frame ids of a compound step
    path: str | None = None  # the case or route a choice took
    ended_by: str | None = None  # how a loop ended: until | max_iterations | items | timeout | no_progress | budget | failed
    cached: bool = False  # the output came from the result cache
    child_run: str | None = None  # run_id of a sub-workflow step's child run
    # fan-out (parallel, map): results by branch name / item index, counters, the next item to start
    results: dict[str, Any] = msgspec.field(default_factory=dict)
    confidences: dict[str, float] = msgspec.field(default_factory=dict)  # fan-out: the confidence of each branch that gave one
    succeeded_n: int = 0
    failed_n: int = 0
    done_n: int = 0
    total: int = 0
    next_index: int = 0
    redo: list[int] = msgspec.field(default_factory=list)  # a redriven map's items that failed under on_failure: continue, to start again
    items: list[Any] | None = None  # a map's items or a for_each loop's list
    unchanged: int = 0  # a loop's iterations in a row whose output did not change (no_progress)
    cost: dict[str, Any] | None = None
    signal: str | None = None  # the signal a wait step waits for
    limit_hold: dict[str, Any] | None = None  # the attempt's acquisition of a limit: {id, limit, key, cost, waiting, since_ms}


class Frame(_State, kw_only=True):
    """A sequence of steps being executed: the root, a branch, a choice path or a loop iteration."""

    id: str
    ref: str  # key of CompiledWorkflow.sequences
    owner: str | None = None  # key of the compound step that started it (None for the root)
    index: int = 0
    status: FrameStatus = "running"
    last_output: Any = None
    last_confidence: float | None = None  # of its last finished step
    error: ErrorInfo | None = None
    scope: dict[str, Any] = msgspec.field(default_factory=dict)  # iteration, previous, item, index
    name: str | None = None  # branch name or item index within its fan-out step
    attempt: int = 1  # a parallel branch restarted by on_failure: retry
    step_keys: list[str] = msgspec.field(default_factory=list)  # steps started in this frame (to drop finished map items)


class Timer(_State, kw_only=True):
    due_ms: int
    kind: TimerKind
    target: str | None = None  # step key
    attempt: int | None = None


class PendingSignal(_State, kw_only=True):
    """A signal no wait took yet: delivered to the next matching wait that starts."""

    signal: str
    data: Any = None
    signal_id: str | None = None
    received_ms: int = 0


class RunState(_State, kw_only=True):
    schema_version: int = 1  # what a state stored without it is; new states are written as SCHEMA_VERSION
    run_id: str
    workflow: str
    version: int
    sha256: str = ""  # of the definition the run is pinned to; "" in a state started before runs were pinned
    redrives: int = 0  # how many times the run was redriven after it failed
    forked_from: dict[str, str] | None = None  # a forked run's source: {"run_id", "step"}
    status: RunStatus = "running"
    input: dict[str, Any] = msgspec.field(default_factory=dict)
    correlation_id: str | None = None
    parent: dict[str, Any] | None = None
    started_ms: int
    finished_ms: int | None = None
    output: Any = None
    confidence: float | None = None  # a succeeded run's: its last step's
    error: ErrorInfo | None = None
    frames: dict[str, Frame] = msgspec.field(default_factory=dict)
    steps: dict[str, StepState] = msgspec.field(default_factory=dict)
    view: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)  # CEL `steps`: latest result by step id
    requests: dict[str, str] = msgspec.field(default_factory=dict)  # pending request_id -> step key
    timers: dict[str, Timer] = msgspec.field(default_factory=dict)
    path: list[str] = msgspec.field(default_factory=list)
    cost: dict[str, Any] = msgspec.field(default_factory=dict)
    cursor: dict[str, int] = msgspec.field(default_factory=dict)  # the shell's last applied offset per source partition
    depth: int = 0  # sub-workflow nesting
    budget_exhausted: bool = False
    cancelled_by: str | None = None  # who cancelled the run (RunCancelRequested.requested_by): its parent needs no notice
    size_hint: int = 0  # an upper estimate of this document's JSON size: the last exact measurement plus what came since
    size_measured: int = 0  # the last exact measurement of this document's JSON size (Run._near_limit)
    signals: list[PendingSignal] = msgspec.field(default_factory=list)  # received, not yet taken by a wait (oldest first)
    signal_ids: list[str] = msgspec.field(default_factory=list)  # signal_ids seen (to drop repeats), oldest first
    priority: int | None = None  # the trigger's (1–5; None: 3), for the limits its steps wait for
    limit_hold: dict[str, Any] | None = None  # the run's acquisition of its concurrency key (like StepState.limit_hold)
    # payloads of this run's that came with completions it ignored (a stale attempt's output): deleted with the run.
    # {"id", "size", "sha256", "partition", "chunks"}; no "$ref", so the shell does not fetch them with the state
    unused_payloads: list[dict[str, Any]] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        """Read a stored state of an older schema version as the current one (msgspec calls this after decoding too)."""
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(f"run state schema version {self.schema_version} is newer than this engine's ({SCHEMA_VERSION})")
        # version 1 -> 2 added fields whose defaults keep a version 1 state's meaning: nothing to convert

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL
