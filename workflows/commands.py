"""What a decision asks the shell to do (imperative), and the records of what it refused (what happened instead)."""
from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict

from legato.topics.limits import LimitAcquire, LimitRelease
from legato.topics.models import ActivityRequested, CachedResult, ChildRunFinished, RequestCancelled, RunAccepted, RunCancelRequested, RunEvent, RunForkAccepted, SignalSent


class _Command(BaseModel):
    model_config = ConfigDict(frozen=True)


class RequestActivity(_Command):
    request: ActivityRequested


class AcquireLimit(_Command):
    """Ask the limiter for a place in a limit's budget (sent to ``<prefix>.limits``, keyed by limit and key); its
    grant comes back as a ``LimitGranted`` event."""

    acquire: LimitAcquire


class ReleaseLimit(_Command):
    """Give an acquisition back (its request completed, timed out or was cancelled, or its grant was not wanted)."""

    release: LimitRelease


class CacheResult(_Command):
    """Store a ``cache: {ttl}`` step's successful result on the result cache, keyed by ``activity`` and ``input``
    (the shell writes it to ``legato.cache`` in the transaction of the decision)."""

    activity: str
    input: Any = None
    result: CachedResult


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


class StartForkedRun(_Command):
    """Start a run forked from another (sent to the coordinator topic, keyed by the new run_id)."""

    seed: RunForkAccepted


class KeepUnusedPayloads(_Command):
    """The run ignored a completion whose output it stored by reference (a stale attempt, a duplicate): its state now
    lists those payloads (``RunState.unused_payloads``), for its retention to delete them with the rest."""

    run_id: str
    payload_ids: list[str]


class ForgetPayloads(_Command):
    """A completion for a run the coordinator does not know (its retention has forgotten it) carried payloads stored
    under that run's id: no state will list them, so they are deleted now (``payloads`` as
    ``RunState.unused_payloads`` lists them)."""

    run_id: str
    payloads: list[dict]


class ForgetRun(_Command):
    """A finished run's retention is over: delete its state (a tombstone on the changelog); its run_id is free again."""

    run_id: str
    workflow: str


class EventIgnored(_Command):
    """A refused transition: duplicate, stale or unknown. Counted by the shell, never silently dropped."""

    run_id: str
    reason: str  # duplicate_trigger | unknown_run | run_finished | duplicate_completion | unknown_request | stale_attempt | stale_timer | stale_child | duplicate_signal | redrive_refused | fork_refused
    detail: str = ""


class SignalRefused(_Command):
    """A signal the run cannot keep (no wait takes it and the run already holds ``MAX_PENDING_SIGNALS``): the shell
    dead-letters ``signal`` with ``reason``. The run's state is unchanged."""

    signal: SignalSent
    reason: str


Command = Union[RequestActivity, AcquireLimit, ReleaseLimit, CacheResult, StartTimer, PublishRunEvent, CancelRequest, StartChildRun, CancelChildRun, NotifyParent, StartForkedRun, ForgetRun, KeepUnusedPayloads, ForgetPayloads, EventIgnored, SignalRefused]
