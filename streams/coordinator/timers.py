"""Durable timers: the run table holds them; in memory only a heap of when each is due. A due timer becomes a
``timer.fired`` record on the coordinator topic, decided by the partition's task like any other event."""
from __future__ import annotations

import asyncio
import heapq
import logging
import sys
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable, Mapping

import orjson
from aiokafka import AIOKafkaProducer

from legato.topics import codec
from legato.topics.models import TimerFired
from legato.workflows import keys
from legato.workflows.state import TERMINAL, RunState

if TYPE_CHECKING:
    from legato.streams.coordinator.task import PartitionTask

log = logging.getLogger("legato.coordinator")


def now_ms() -> int:
    return int(time.time() * 1000)


class Timers:
    """Pending timers in memory; the run table is the truth, rescanned whenever a partition is assigned."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, str, str]] = []
        self._scheduled: set[tuple[str, str]] = set()

    def schedule(self, run_id: str, timer_id: str, due_ms: int) -> None:
        timer_id = sys.intern(timer_id)  # the same few ids ("s0:timeout:1", "run:retention") in every run: stored once
        if (run_id, timer_id) not in self._scheduled:
            self._scheduled.add((run_id, timer_id))
            heapq.heappush(self._heap, (due_ms, run_id, timer_id))

    def due(self, now: int) -> list[tuple[str, str]]:
        fired = []
        while self._heap and self._heap[0][0] <= now:
            _, run_id, timer_id = heapq.heappop(self._heap)
            self._scheduled.discard((run_id, timer_id))
            fired.append((run_id, timer_id))
        return fired

    def rearm(self, stored: Iterable[bytes], retention_due: Callable[[RunState], int]) -> None:
        """Schedule every timer of the stored run states (a partition was just loaded), and the retention of a run
        that finished before runs had a retention timer (at ``retention_due(state)``)."""
        for raw in stored:
            doc = orjson.loads(raw)  # not a RunState: a restore reads every retained run, and a full validation costs more
            timers = doc.get("timers") or {}
            for timer_id, timer in timers.items():
                self.schedule(doc["run_id"], timer_id, timer["due_ms"])
            if doc.get("status", "running") in TERMINAL and not any(t.get("kind") == "retention" for t in timers.values()):
                self.schedule(doc["run_id"], keys.RUN_RETENTION, retention_due(RunState.model_validate(doc)))


Look = Callable[[dict[str, int]], Awaitable[tuple[set[str], dict[int, int]]]]
"""``AnswerFence.look``: of the request ids whose timeouts are due (→ their run's partition), those with an answer still
on its way from another partition, and the end of every completions partition."""

_WAIT_FOR_ANSWER_MS = 100
"""A due timeout whose request's answer is in the log but not yet decided looks again this much later."""


async def fire_timers(tasks: Mapping[int, "PartitionTask"], producer: AIOKafkaProducer, topic: str, look: Look) -> None:
    """Every 20 ms, send the due timers of the active tasks (``tasks`` is the live map of them) to ``topic``."""
    while True:
        await asyncio.sleep(0.02)
        try:
            await _fire_due(tasks, producer, topic, look)
        except Exception:  # one round's trouble (a partition closed under us) must not stop every timer
            log.exception("firing timers failed")


async def _fire_due(tasks: Mapping[int, "PartitionTask"], producer: AIOKafkaProducer, topic: str, look: Look) -> None:
    now = now_ms()
    due: list[tuple["PartitionTask", str, str]] = []
    for task in list(tasks.values()):
        for run_id, timer_id in task.timers.due(now):
            raw = task.store.get(run_id.encode())
            if raw is None or not (keys.timer_pending(raw, timer_id) or (timer_id == keys.RUN_RETENTION and RunState.model_validate_json(raw).finished)):
                continue  # finished or cleared since it was set
            if run_id in task.early_runs:
                # the run has requests out ahead of a transaction not yet committed: a timer decided after them could be
                # read before them by a new owner if that transaction is lost (docs/concepts/guarantees.md)
                task.timers.schedule(run_id, timer_id, now + 20)
                continue
            due.append((task, run_id, timer_id))
    if not due:
        return
    timeouts = {request: task.partition for task, run_id, timer_id in due if (request := keys.timed_out_request(run_id, timer_id)) is not None}
    try:
        pending, marks = await look(timeouts)
    except Exception as exc:  # the broker is away: the timers are in the table, try again shortly
        log.warning("cannot look for answers before firing %d timers (%s: %s); retrying", len(due), type(exc).__name__, exc)
        for task, run_id, timer_id in due:
            task.timers.schedule(run_id, timer_id, now_ms() + 1000)
        return
    for task, run_id, timer_id in due:
        if tasks.get(task.partition) is not task:
            continue  # closed or reloaded meanwhile; a reload re-arms its timers
        if keys.timed_out_request(run_id, timer_id) in pending:
            task.timers.schedule(run_id, timer_id, now_ms() + _WAIT_FOR_ANSWER_MS)  # its answer is on its way
            continue
        fired = TimerFired(run_id=run_id, timer_id=timer_id, completions_offset=marks.get(task.partition))
        try:
            await producer.send(topic, codec.dumps(fired), key=run_id.encode())
        except Exception as exc:  # the broker is away: the timer is in the table, try again shortly
            log.warning("cannot fire timer %s of run %s (%s); retrying", timer_id, run_id, exc)
            task.timers.schedule(run_id, timer_id, now_ms() + 1000)
