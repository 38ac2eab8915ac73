"""Trigger marks: how far each trigger partition has been decided, sent to the limiter so that runs of one concurrency
key start in trigger order although their triggers are decided on several partitions, each at its own pace.

A partition's mark says: every trigger whose timestamp is before it has been decided, its decision committed (and
with it the run's acquisition of its concurrency key, ``limit.acquire``). The limiter grants a key to a run only once
every trigger partition's mark has passed the run's trigger time (``workflows.limiter``), so a trigger sitting on a
partition whose coordinator was just SIGKILLed holds back the later triggers of its key until the partition is
taken over and decides it.

How a coordinator computes its partition ``p``'s mark (``Marks.mark``), from what it committed:

- the lowest timestamp of the triggers it has polled and not yet committed, and of the triggers forwarded to it
  (``run.accepted`` on the coordinator topic, which carry their trigger's time);
- else, when it has handed out every record of the partition the broker had at its last fetch (both the triggers
  and the coordinator topic), that fetch's time less ``SLACK_MS`` (a trigger produced before it but not yet
  appended: produce latency and clock skew);
- a trigger forwarded to its run's partition (a trigger without a run_id, or on another partition) is decided
  there, not here: for ``FORWARD_HOLD_MS`` after its forward commits, this partition's mark stays at its trigger
  time, the time the run's partition takes to fetch it (and report it as undecided);
- a mark only moves forward; a partition whose coordinator is down keeps its last mark (a mark stays true).

The records go out after the commits they describe, on the process's idempotent producer, one per partition of
``<prefix>.limits`` (every limiter partition needs every mark), ``MARKS_EVERY_S`` apart, and only while a deployed
workflow has a ``concurrency`` key. Being after the commit, a mark reaches each limits partition after the
acquisitions it covers (read_committed reads in offset order).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import TopicPartition

from legato.streams import kafka_io
from legato.topics import codec
from legato.topics.limits import TriggersDecided

if TYPE_CHECKING:
    from legato.streams.coordinator.loop import Coordinator
    from legato.streams.coordinator.task import PartitionTask

log = logging.getLogger("legato.coordinator")

MARKS_EVERY_S = 0.1
SLACK_MS = 250
"""A trigger produced this long before a fetch may still not be in it (produce latency, the producers' clocks)."""
FORWARD_HOLD_MS = 1_000
_FORWARD = b'{"type":"run.accepted"'


def wall_ms() -> int:
    return int(time.time() * 1000)


class Undecided:
    """One partition's triggers polled and not yet committed, and its held forwards (``PartitionTask.marks``)."""

    def __init__(self) -> None:
        self.triggers: deque[tuple[int, int]] = deque()  # (offset, trigger ms) on the triggers topic
        self.forwarded: deque[tuple[int, int]] = deque()  # (offset, trigger ms) of run.accepted on the coordinator topic
        self.holds: deque[tuple[int, int]] = deque()  # (until ms, trigger ms) of triggers this partition forwarded
        self.mark = 0

    def polled_trigger(self, offset: int, timestamp: int) -> None:
        self.triggers.append((offset, timestamp))

    def polled_coordinator(self, offset: int, value: bytes | None, timestamp: int) -> None:
        if value is not None and value.startswith(_FORWARD):
            self.forwarded.append((offset, _triggered_ms(value, timestamp)))

    def committed(self, triggers_next: int | None, coordinator_next: int | None, forwards: list[int], now_ms: int) -> None:
        """A batch committed: the inputs resume at these offsets; ``forwards``: the trigger times it forwarded."""
        if triggers_next is not None:
            while self.triggers and self.triggers[0][0] < triggers_next:
                self.triggers.popleft()
        if coordinator_next is not None:
            while self.forwarded and self.forwarded[0][0] < coordinator_next:
                self.forwarded.popleft()
        for triggered in forwards:
            self.holds.append((now_ms + FORWARD_HOLD_MS, triggered))

    def compute(self, caught_up_ms: int | None, now_ms: int) -> int:
        """The mark now (``caught_up_ms``: the time of the fetch that found nothing more to hand out, or None)."""
        while self.holds and self.holds[0][0] <= now_ms:
            self.holds.popleft()
        pending = [ts for _, ts in self.triggers] + [ts for _, ts in self.forwarded] + [ts for _, ts in self.holds]
        if pending:
            mark = min(pending)
        elif caught_up_ms is not None:
            mark = caught_up_ms - SLACK_MS
        else:
            return self.mark  # fetching is behind or paused: no news
        self.mark = max(self.mark, mark)
        return self.mark


def _triggered_ms(value: bytes, timestamp: int) -> int:
    try:
        triggered = orjson.loads(value).get("triggered_ms")
    except (orjson.JSONDecodeError, AttributeError):
        return timestamp
    return int(triggered) if isinstance(triggered, int) else timestamp


def forwarded_triggers(sends: list[Any], coordinator_topic: str, keyed: Any) -> list[int]:
    """The trigger times of the keyed runs a batch forwarded to their partitions (``keyed(workflow)``: the workflow
    has a concurrency key)."""
    out = []
    for topic, _, value, _ in sends:
        if topic == coordinator_topic and isinstance(value, bytes) and value.startswith(_FORWARD):
            raw = orjson.loads(value)
            if keyed(raw.get("workflow")) and isinstance(raw.get("triggered_ms"), int):
                out.append(raw["triggered_ms"])
    return out


def caught_up_ms(consumer: Any, tps: list[Any]) -> int | None:
    """The time of the oldest of the last fetches of ``tps`` when every record they found has been handed out, else
    None."""
    times = []
    for tp in tps:
        position = kafka_io.fetched_position(consumer, tp)
        stable = consumer.last_stable_offset(tp)
        polled = consumer.last_poll_timestamp(tp)
        if position is None or stable is None or stable < 0 or polled is None or position < stable:
            return None
        times.append(polled)
    return min(times) if times else None


async def send_marks(c: "Coordinator", producer: Any, every_s: float = MARKS_EVERY_S) -> None:
    """Send this process's partitions' marks to every limits partition while a deployed workflow has a concurrency key."""
    limits = c.topics.limits
    failures = 0
    while True:
        await asyncio.sleep(every_s)
        if not c.keyed_workflows():
            continue
        now = wall_ms()
        marks: dict[int, int] = {}
        for p, task in list(c.tasks.items()):
            tps = [TopicPartition(c.topics.triggers, p), TopicPartition(c.topics.coordinator, p)]
            try:
                mark = task.marks.compute(caught_up_ms(c.consumer, tps), now)
            except Exception as exc:  # an assignment changing under it: the next round
                log.debug("partition %d: no trigger mark (%s)", p, exc)
                continue
            if mark > 0:
                marks[p] = mark
        if not marks:
            continue
        value = codec.dumps(TriggersDecided(partitions=c.partition_count, marks=marks))
        try:
            futures = [await producer.send(limits, value, key=b"triggers-decided", partition=q) for q in range(c.partition_count)]
            await asyncio.gather(*futures)
            failures = 0
        except Exception as exc:  # the broker away: keyed runs wait for the next marks, nothing else does
            failures += 1
            if failures in (1, 10, 100):
                log.warning("sending trigger marks failed (%d in a row): %s: %s", failures, type(exc).__name__, exc)
