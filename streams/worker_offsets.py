"""The request offsets a worker may commit: everything before the oldest request it has not answered yet.

Workers commit their request topics' offsets themselves instead of acknowledging messages to faust. faust's
acknowledgement bookkeeping (``Consumer._new_offset``) mishandles the offset gaps that transaction markers leave on
topics written in transactions (every request topic: the coordinator writes them in its transactions): the gap it
records for a record after a marker includes the record's own offset, which is then acknowledged a second time, and
each duplicate in its sorted list of acknowledged offsets ends the run of consecutive offsets it commits. The
committed offset then advanced by one or two records per commit and stayed hundreds of records behind the requests
answered; on every rebalance the partition's next owner executed all of those again (RELIABILITY.md, "Found while
testing"). Tracking the offsets in flight makes the gaps irrelevant: the committable offset of a partition is its
oldest request not yet answered, or, with none, the offset after the last request received.

Pure bookkeeping, no Kafka: ``Workers`` feeds it and commits what it returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable


@dataclass(frozen=True)
class Delivery:
    """One request record as received: its partition, offset and the assignment it was received under."""

    tp: Hashable
    offset: int
    epoch: int


@dataclass
class _Partition:
    epoch: int
    in_flight: set[int] = field(default_factory=set)
    next_offset: int | None = None  # after the last record received
    committed: int | None = None  # what this process last committed


class RequestOffsets:
    """Offsets received and answered per partition, and the offset each partition may commit."""

    def __init__(self) -> None:
        self._partitions: dict[Hashable, _Partition] = {}
        self._epoch = 0

    def received(self, tp: Hashable, offset: int) -> Delivery:
        """A record reached the worker: it is in flight until :meth:`answered`."""
        part = self._partitions.get(tp)
        if part is None:
            self._epoch += 1
            part = self._partitions[tp] = _Partition(self._epoch)
        part.in_flight.add(offset)
        if part.next_offset is None or offset >= part.next_offset:
            part.next_offset = offset + 1
        return Delivery(tp, offset, part.epoch)

    def answered(self, delivery: Delivery) -> None:
        """The request at ``delivery`` is done (its completion delivered, or it needs none). A delivery received
        before its partition was revoked is ignored: the partition's next owner reads it again."""
        part = self._partitions.get(delivery.tp)
        if part is not None and part.epoch == delivery.epoch:
            part.in_flight.discard(delivery.offset)

    def committable(self) -> dict[Hashable, int]:
        """The offset each partition may commit, where it is ahead of what was last committed."""
        out = {}
        for tp, part in self._partitions.items():
            if part.next_offset is None:
                continue
            offset = min(part.in_flight) if part.in_flight else part.next_offset
            if part.committed is None or offset > part.committed:
                out[tp] = offset
        return out

    def committed(self, offsets: dict[Hashable, int]) -> None:
        """``offsets`` were committed."""
        for tp, offset in offsets.items():
            part = self._partitions.get(tp)
            if part is not None and (part.committed is None or offset > part.committed):
                part.committed = offset

    def revoked(self, tps: set[Hashable] | frozenset[Hashable]) -> None:
        """The partitions ``tps`` were taken away: forget them (their requests in flight are the next owner's)."""
        for tp in tps:
            self._partitions.pop(tp, None)

    def in_flight(self, tp: Hashable) -> int:
        """How many requests of ``tp`` are received and not answered."""
        part = self._partitions.get(tp)
        return len(part.in_flight) if part is not None else 0
