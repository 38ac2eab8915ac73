"""Partitions assigned and revoked: a revoked task is parked (and reused when the next rebalance hands it back), a
new partition is opened by the consume loop (fence the previous owner, load the run table, seek), and a partition
whose batch failed is reloaded from the log."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from legato.streams import security
from legato.streams.kafka_io import group_membership, keyed_partitioner, transaction_retry_backoff
from legato.streams.coordinator.table import RunTable
from legato.streams.coordinator.task import PartitionTask

if TYPE_CHECKING:
    from legato.streams.coordinator.loop import Coordinator

log = logging.getLogger("legato.coordinator")

_TRANSACTION_TIMEOUT_MS = 60_000
"""A transaction left open by a process that died without a successor blocks read_committed readers this long (a
successor aborts it at once). Shorter would let the broker abort a live transaction stuck behind a broker restart."""

_TRANSACTION_RETRY_BACKOFF_MS = 20
"""aiokafka's default (100 ms) also paces CONCURRENT_TRANSACTIONS retries: most of the p99 overhead (BENCHMARKS.md)."""

_CONCURRENT_TRANSACTIONS_BACKOFF_S = 0.002
"""The wait before asking again to add a partition to a transaction while the previous one's markers are written
(aiokafka: 20 ms). At 260 steps/s, alternating 20 ms and 2 ms over four runs: the p99 of "records acknowledged"
22.1 / 22.6 ms → 7.5 / 8.6 ms (BENCHMARKS.md, latency)."""


class Rebalance(ConsumerRebalanceListener):
    """Keeps the coordinator's active tasks (``c.tasks``) in step with the consumer's assignment."""

    def __init__(self, coordinator: "Coordinator"):
        self.c = coordinator
        self._lock = asyncio.Lock()
        self._parked: dict[int, PartitionTask] = {}
        self._parked_as: tuple[Any, Any] = (None, None)  # (member id, generation) when the tasks were parked
        self._pending: set[int] = set()  # assigned partitions to open (or reopen) from the consume loop

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Park the revoked tasks once their batch in hand has committed; they are reused if assigned back. What
        they had queued is dropped: it is not committed, so whoever owns the partition next reads it again."""
        tasks = self.c.tasks
        async with self._lock:
            partitions = {tp.partition for tp in revoked}
            for p in sorted(partitions & set(tasks)):
                task = tasks[p]
                async with task.busy:
                    if tasks.get(p) is not task:
                        continue  # its last batch failed and closed it: the partition was pending a reload
                    del tasks[p]
                    task.inbox, task.queued, task.paused = [], 0, False
                    task.wake.set()  # its loop sees it is no longer active and ends
                self._parked[p] = task
            self._pending -= partitions
            self._parked_as = group_membership(self.c.consumer)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        """Keep the parked tasks assigned back, and leave the new partitions paused for the consume loop to open:
        this callback runs without heartbeats, so loading run tables here could cost the group membership."""
        consumer = self.c.consumer
        async with self._lock:
            wanted = {tp.partition for tp in assigned}
            member, generation = group_membership(self.c.consumer)
            # reused only across one rebalance this member took part in: nobody else owned them in between
            if member is not None and member == self._parked_as[0] and generation == (self._parked_as[1] or 0) + 1:
                for p in sorted(wanted & set(self._parked)):
                    task = self._parked.pop(p)
                    for tp, offset in task.next_offset.items():
                        if tp in assigned:
                            consumer.seek(tp, offset)  # what it dropped from its queue is read again
                    self.c.start(task)
            await self.close_parked()
            self._pending = wanted - set(self.c.tasks)
            paused = [tp for tp in assigned if tp.partition in self._pending]
            if paused:
                consumer.pause(*paused)

    async def close_parked(self) -> None:
        parked = list(self._parked)
        self.c.tasks.update(self._parked)
        self._parked.clear()
        await self._close_tasks(parked)

    async def stop(self) -> None:
        """The process is leaving: close every task."""
        self._parked.update(self.c.tasks)
        self.c.tasks.clear()
        await self.close_parked()

    async def reload(self, task: PartitionTask, why: str) -> None:
        """Drop a partition's task and open it again from the log (the consume loop does, with back-off)."""
        log.warning("partition %d: reloading it from the changelog (%s)", task.partition, why)
        await self._close_tasks([task.partition])
        tps = self.c.assigned(task.partition)
        if tps:
            self._pending.add(task.partition)
            self.c.consumer.pause(*tps)

    async def open_pending(self) -> bool:
        """Open the pending partitions; False when one could not be opened (it stays pending)."""
        async with self._lock:
            for p in sorted(self._pending):
                try:
                    await self._open_task(p)
                except Exception as exc:
                    log.warning("partition %d: cannot open it (%s: %s); trying again", p, type(exc).__name__, exc)
                    return False
                self._pending.discard(p)
                self.c.consumer.resume(*self.c.assigned(p))
        return True

    async def _open_task(self, p: int) -> None:
        """Fence the previous owner, load the run table from the changelog, resume from the committed offsets."""
        c = self.c
        consumer = c.consumer
        started = time.perf_counter()
        transaction_retry_backoff(_CONCURRENT_TRANSACTIONS_BACKOFF_S)
        producer = AIOKafkaProducer(
            bootstrap_servers=c.settings.bootstrap,
            transactional_id=f"{c.group}-{p}",
            acks="all",  # implied by the transaction; stated because a replicated changelog relies on it
            transaction_timeout_ms=_TRANSACTION_TIMEOUT_MS,
            linger_ms=0,
            partitioner=keyed_partitioner,
            retry_backoff_ms=_TRANSACTION_RETRY_BACKOFF_MS,
            **security.aiokafka_kwargs(),
        )
        try:
            task = PartitionTask(p, producer, RunTable(self._store_path(p)))
        except BaseException:
            await producer.stop()
            raise
        try:
            await producer.start()  # InitProducerId: aborts the dead owner's open transaction, fences it for good
            loaded = await c.partitions.restore(task, c.settings.bootstrap) if p < c.partition_count else 0
            for topic in c.inputs:
                tp = TopicPartition(topic, p)
                if tp not in consumer.assignment():
                    continue
                committed = await consumer.committed(tp)  # asked after the fence: no pending offsets left
                # the changelog's offsets record is committed with every batch, the group's offsets now and then
                stored = task.restored_offsets.get(tp)
                if stored is not None and (committed is None or stored > committed):
                    committed = stored
                if committed is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, committed)
                    task.next_offset[tp] = committed
        except BaseException:
            await producer.stop()
            task.store.close()
            raise
        c.start(task)
        log.info("partition %d: %d runs loaded in %.2fs", p, loaded, time.perf_counter() - started)

    async def _close_tasks(self, partitions: list[int]) -> None:
        for p in partitions:
            task = self.c.tasks.pop(p, None)
            if task is None:
                continue
            task.wake.set()  # its loop sees it is no longer active and ends (it may be the caller)
            try:
                await task.producer.stop()
            except Exception as exc:
                log.warning("partition %d: closing its producer failed: %s", p, exc)
            task.store.close()
        if partitions:
            self.c.partitions.forget()

    def _store_path(self, p: int) -> Path | None:
        settings = self.c.settings
        if settings.store != "rocksdb":
            return None
        return settings.data_dir / self.c.group / f"runs-{p}"
