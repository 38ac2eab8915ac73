"""When a due timer may fire: never ahead of a worker's answer that is already in the log.

A step's timeout is a deadline on the worker's answer, but the coordinator learns of both through Kafka, and after
a crash or under a backlog it can read the timer's record before an answer that was written earlier. Two rules keep
the answer first (docs/concepts/guarantees.md):

- Before it fires the timeout of a request, the coordinator looks for that request's answer in the other partitions
  of the completions topic, beyond the offsets the coordinator group has decided and committed: an answer produced
  to another partition than its run's waits there to be re-keyed, and after a crash that partition's new owner may
  not have read it yet. While one is there, the timer waits.
- Every ``timer.fired`` carries the end of its run's completions partition when it fired (``completions_offset``:
  the log end, open transactions included, such as the re-keyed copy of an answer), and the partition's task decides
  it only after every completion before that offset (``Partitions._answers_read``). So an answer in the log when the
  timer fired is decided first, also by a new owner that reads both again after a crash.

Why that order holds: an answer the look does not find on another partition was decided there before the look
began, and that owner's transaction, committed by then, appended its re-keyed copy to the run's partition before
the end offset the mark takes.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from legato.streams import kafka_io

if TYPE_CHECKING:
    from legato.streams.coordinator.task import PartitionTask

SCAN_TIMEOUT_S = 5.0
"""How long one look for pending answers may read before the timers it was for wait for the next look."""


_NOT_ANSWERS = ("activity.started", "activity.heartbeat")
"""Types of the completions topic's records that say a handler runs, not how it ended."""


class AnswerFence:
    """Looks for answers still on their way to their run's partition (``pending``) and gives each partition's mark."""

    def __init__(self, bootstrap: str, completions: str, partitions: int, group: Callable[[], AIOKafkaConsumer],
                 tasks: Mapping[int, "PartitionTask"], **kafka: Any):
        self._completions = completions
        self._tps = [TopicPartition(completions, p) for p in range(partitions)]
        self._group = group  # the coordinator's group consumer: its committed offsets
        self._tasks = tasks  # this process's active partition tasks: their offsets are newer than the group's
        # read_uncommitted: the log end (not the last stable offset) and answers not yet committed count. On another
        # partition than its run's an answer is only ever a worker's own record, never a transaction's copy.
        self._reader = kafka_io.reader(bootstrap, isolation_level="read_uncommitted", **kafka)
        self._started = False

    async def start(self) -> None:
        await self._reader.start()
        self._reader.assign(self._tps)
        self._started = True

    async def stop(self) -> None:
        if self._started:
            await self._reader.stop()

    async def look(self, requests: dict[str, int]) -> tuple[set[str], dict[int, int]]:
        """Of ``requests`` (ids whose timeouts are due → their run's partition), those with an answer on another
        completions partition that the coordinator has not decided yet, and the end of every completions partition,
        taken after the offsets decided were (what ``timer.fired`` carries). Raises when the broker does not answer
        (the timers wait for the next look)."""
        decided = await kafka_io.committed_offsets(self._group(), self._tps)
        for p, task in list(self._tasks.items()):
            tp = TopicPartition(self._completions, p)
            if tp in task.next_offset:
                decided[tp] = max(decided.get(tp, 0), task.next_offset[tp])
        ends = await self._reader.end_offsets(self._tps)  # read_uncommitted: the log ends
        pending: set[str] = set()
        if requests:
            pending = await self._scan({tp: (decided.get(tp), end) for tp, end in ends.items()}, requests)
        return pending, {tp.partition: end for tp, end in ends.items()}

    async def _scan(self, ranges: dict[TopicPartition, tuple[int | None, int]], requests: dict[str, int]) -> set[str]:
        todo = {}
        for tp, (start, end) in ranges.items():
            if start is None:
                await self._reader.seek_to_beginning(tp)
            elif start < end:
                self._reader.seek(tp, start)
            else:
                continue
            todo[tp] = end
        found: set[str] = set()
        if not todo:
            return found
        deadline = time.monotonic() + SCAN_TIMEOUT_S
        needle = [r.encode() for r in requests]
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {len(todo)} completions partitions for pending answers took over {SCAN_TIMEOUT_S}s")
            for tp in list(todo):
                if await self._reader.position(tp) >= todo[tp]:
                    del todo[tp]
            if not todo:
                break
            batch = await self._reader.getmany(*todo, timeout_ms=200, max_records=5000)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= todo.get(tp, 0) or record.value is None or not any(n in record.value for n in needle):
                        continue
                    request_id = answered(record.value)
                    if request_id in requests and requests[request_id] != tp.partition:
                        found.add(request_id)
        return found


def answered(value: bytes) -> str | None:
    """The request id a completions record answers: a worker's completion's; None for anything else, an
    ``activity.started`` or ``activity.heartbeat`` record too (a handler that started or is alive has not answered)."""
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or record.get("type") in _NOT_ANSWERS:
        return None
    request_id = record.get("request_id")
    return request_id if isinstance(request_id, str) else None

