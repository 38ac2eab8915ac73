"""One input partition's task as the coordinator holds it between batches, and how it is loaded from the changelog."""
from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Callable

from aiokafka import AIOKafkaProducer, TopicPartition

from legato.streams import kafka_io, security
from legato.streams.coordinator.batch import decode_offsets
from legato.streams.coordinator.marks import Undecided
from legato.streams.coordinator.table import RunTable
from legato.streams.coordinator.timers import Timers
from legato.streams.metrics import count_in_flight
from legato.topics.names import CHANGELOG_OFFSETS_KEY
from legato.workflows.state import RunState


class PartitionTask:
    """Input partition ``p``: its run table, its transactional producer, where each input topic resumes."""

    def __init__(self, partition: int, producer: AIOKafkaProducer, store: RunTable):
        self.partition = partition
        self.producer = producer
        self.store = store
        self.next_offset: dict[TopicPartition, int] = {}
        self.running = 0
        self.stored = 0  # runs in the table (running and retained)
        self.timers = Timers()  # fired only while the task is active (not while it is parked in a rebalance)
        self.inbox: list[tuple[TopicPartition, list[Any], float]] = []  # polled, not yet decided
        self.queued = 0
        self.wake = asyncio.Event()
        self.busy = asyncio.Lock()  # held while a batch is decided and committed
        self.loop: asyncio.Task | None = None
        self.paused = False
        self.restored_offsets: dict[TopicPartition, int] = {}  # from the changelog's offsets record
        self.group_offsets_at = 0.0  # monotonic time the group's offsets were last committed
        self.group_offsets_behind = False  # a batch committed since then without them
        self.commit_began = 0.0  # monotonic time its last transaction began
        self.marks = Undecided()  # its triggers not yet committed: how far it has decided them (coordinator.marks)
        self.early_runs: Counter[str] = Counter()  # runs with requests sent ahead of a transaction not yet committed (per batch)


async def restore(task: PartitionTask, bootstrap: str, changelog: str, retention_due: Callable[[RunState], int]) -> int:
    """Read changelog partition ``p`` to its last stable offset; re-arm the timers of the runs in it (``retention_due``:
    when a run that finished before runs had a retention timer is forgotten). The number of runs loaded."""
    def put(record: Any) -> None:
        if record.key == CHANGELOG_OFFSETS_KEY:
            task.restored_offsets = decode_offsets(record.value)
        elif record.value is None:  # a forgotten run: skipping the tombstone would bring it back
            task.store.delete(record.key)
        else:
            task.store.put(record.key, record.value)

    reader = kafka_io.reader(bootstrap, max_partition_fetch_bytes=8 * 1024 * 1024, **security.aiokafka_kwargs())
    try:
        await reader.start()
        await kafka_io.read_partition(reader, TopicPartition(changelog, task.partition), put)
    finally:
        await reader.stop()
    loaded = task.store.count()
    task.timers.rearm(task.store.values(), retention_due)
    task.running = count_in_flight(task.store.values())
    task.stored = loaded
    return loaded
