"""The machine's commands become records of the batch's transaction (timers are armed once it has committed).

A request the result cache answers becomes its cached completion instead (``cache``)."""
from __future__ import annotations

import logging
from typing import Any, Callable

from legato.streams.coordinator.cache import ResultTable, entry_record
from legato.streams.coordinator.inbox import Send
from legato.topics import codec
from legato.topics.limits import limit_key
from legato.topics.names import Topics
from legato.workflows.commands import AcquireLimit, ReleaseLimit
from legato.workflows.machine import (
    CacheResult,
    CancelChildRun,
    CancelRequest,
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

log = logging.getLogger("legato.coordinator")

_TO_COORDINATOR = {StartChildRun: "accepted", CancelChildRun: "cancel", NotifyParent: "finished", StartForkedRun: "seed"}
"""Commands whose record goes to the coordinator topic, keyed by the run it is for: command type → its field."""


def carry_out(commands: list[Any], topics: Topics, sends: list[Send], timers: list[StartTimer], ignored: Callable[[str], None],
              refused: Callable[[str], None], cache: ResultTable | None = None, requests: list[Send] | None = None) -> None:
    """Append the records of ``commands`` to ``sends`` and their timers to ``timers``; count ignored events; hand
    the reason of a refused signal to ``refused`` (which dead-letters the record being decided). A request that
    ``cache`` answers is not sent: its cached completion goes to the completions topic (``coordinator.cache``).
    Activity requests go to ``requests`` when it is given (the partition task decides which of them may be sent
    ahead of the transaction), else to ``sends``."""
    for command in commands:
        if isinstance(command, RequestActivity):
            req = command.request
            hit = cache.answer(req) if cache is not None else None
            if hit is not None:
                sends.append((topics.completions, req.run_id.encode(), codec.dumps(hit), None))
            else:
                (sends if requests is None else requests).append((topics.requests(req.activity), req.run_id.encode(), codec.dumps(req), None))
        elif isinstance(command, AcquireLimit):
            a = command.acquire
            sends.append((topics.limits, limit_key(a.limit, a.key).encode(), codec.dumps(a), None))
        elif isinstance(command, ReleaseLimit):
            r = command.release
            sends.append((topics.limits, limit_key(r.limit, r.key).encode(), codec.dumps(r), None))
        elif isinstance(command, CacheResult):
            sends.append(entry_record(command, topics))
        elif isinstance(command, StartTimer):
            timers.append(command)
        elif isinstance(command, PublishRunEvent):
            value = codec.dumps(command.event)
            sends.append((topics.runs, command.event.run_id.encode(), value, None))
            if command.completion_topic:
                sends.append((command.completion_topic, command.event.run_id.encode(), value, None))
        elif isinstance(command, CancelRequest):
            c = command.cancel
            sends.append((topics.cancellations, c.run_id.encode(), codec.dumps(c), None))
        elif type(command) in _TO_COORDINATOR:  # records another run (or the run itself, later) decides
            record = getattr(command, _TO_COORDINATOR[type(command)])
            sends.append((topics.coordinator, record.run_id.encode(), codec.dumps(record), None))
        elif isinstance(command, ForgetRun):
            pass  # the partition task deletes the state and writes the tombstone (partition.Partitions._apply)
        elif isinstance(command, KeepUnusedPayloads):
            pass  # only the run's state changes: the payloads are deleted when it is forgotten
        elif isinstance(command, ForgetPayloads):
            pass  # the partition task sends their tombstones in this batch (partition.Partitions._apply)
        elif isinstance(command, SignalRefused):  # e.g. a run keeps 64 at most
            refused(f"signal refused: {command.reason}")
            log.info("refused signal %r for run %s: %s", command.signal.signal, command.signal.run_id, command.reason)
        elif isinstance(command, EventIgnored):
            ignored(command.reason)
            log.info("ignored event for run %s: %s %s", command.run_id, command.reason, command.detail)
        else:
            raise TypeError(f"the coordinator cannot carry out {type(command).__name__}")
