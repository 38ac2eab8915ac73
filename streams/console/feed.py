"""Feeds a RunIndex from Kafka: a group-less consumer of every run-keyed topic, positioned from the index.

No consumer group and no committed offsets: the index stores its own positions with what they produced, so any
number of console processes (each with its own file) read the same topics without taking partitions from each
other, and deleting the file makes the next start read everything again.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from legato.streams import kafka_io
from legato.streams.console.index import RunIndex, open_index
from legato.topics.names import Topics

log = logging.getLogger(__name__)

TOPIC_REFRESH_S = 10.0  # how often new topics (a new activity's requests topic) are looked for
EARLY_REFRESH_S = 1.0  # ... while the runs topic or the changelog do not exist yet (a console started first)
MAX_RECORDS = 2000


class Feed:
    """``async with Feed(...) as feed: await feed.catch_up()`` or ``await feed.follow(on_change)``."""

    def __init__(self, bootstrap: str, index: RunIndex, prefix: str, **kafka: object):
        self.index = index
        self.topics = Topics(prefix)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                         auto_offset_reset="earliest", **{"isolation_level": "read_committed", **kafka})
        self._assigned: set[TopicPartition] = set()

    async def __aenter__(self) -> "Feed":
        try:
            await self.consumer.start()
            await self._assign()
        except BaseException:
            await self.consumer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    def _wanted(self, topic: str) -> bool:
        t = self.topics
        return topic in (t.runs, t.triggers, t.changelog, t.coordinator, t.completions, t.cancellations, t.signals, t.progress, t.definitions) \
            or topic.startswith(t.requests(""))

    async def _assign(self) -> bool:
        """Assign every partition of the wanted topics that exist now; True when that set grew."""
        metadata = await kafka_io.fresh_metadata(self.consumer)
        tps = {TopicPartition(topic, p) for topic in metadata.topics() if self._wanted(topic)
               for p in (metadata.partitions_for_topic(topic) or ())}
        if tps <= self._assigned:
            return False
        new = tps - self._assigned
        self._assigned |= tps
        self.consumer.assign(sorted(self._assigned))
        # a partition the index has read from resumes there; any other starts at the earliest offset (the
        # consumer's reset policy: one batched reset, where a seek_to_beginning per partition waits for each)
        for (topic, partition), at in self.index.positions().items():
            tp = TopicPartition(topic, partition)
            if tp in self._assigned:
                self.consumer.seek(tp, at)
        log.info("console feed reads %d partitions (%d new)", len(self._assigned), len(new))
        return True

    async def _poll(self, timeout_ms: int) -> int:
        if not self._assigned:
            await asyncio.sleep(timeout_ms / 1000)
            return 0
        batch = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=MAX_RECORDS)
        records = [(tp.topic, tp.partition, r.offset, r.key, r.value, r.timestamp) for tp, rs in batch.items() for r in rs]
        return self.index.apply_all(records) if records else 0

    async def catch_up(self, timeout: float = 60.0) -> None:
        """Read every assigned partition up to its end offset as of now."""
        if not self._assigned:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ends = await self.consumer.end_offsets(list(self._assigned))
        while True:
            behind = [tp for tp, end in ends.items() if await self.consumer.position(tp) < end]
            if not behind:
                return
            if loop.time() > deadline:
                raise TimeoutError(f"the run index did not catch up with {len(behind)} partitions within {timeout:g}s")
            await self._poll(200)

    async def follow(self, on_change: Callable[[], None] | None = None) -> None:
        """Apply records as they come, forever; ``on_change`` after every batch that changed the index."""
        loop = asyncio.get_running_loop()
        next_refresh = loop.time()
        while True:
            try:
                changed = await self._poll(500)
            except KafkaError as exc:  # the broker may be away for a while: serve what the index has, and retry
                log.warning("console feed: cannot read: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if changed and on_change:
                on_change()
            if loop.time() >= next_refresh:
                core = {self.topics.runs, self.topics.changelog} <= {tp.topic for tp in self._assigned}
                next_refresh = loop.time() + (TOPIC_REFRESH_S if core else EARLY_REFRESH_S)
                try:
                    await self._assign()
                except KafkaError as exc:  # the broker may be away for a while; keep serving what we have
                    log.warning("console feed: cannot refresh topics: %s", exc)


async def fresh_index(bootstrap: str, prefix: str, data_dir, name: str = "cli", timeout: float = 60.0, **kafka: object) -> RunIndex:
    """This machine's ``name`` index, caught up with the topics as they are now (what ``legato runs`` reads)."""
    index = open_index(data_dir, prefix, name, wait=True)
    try:
        async with Feed(bootstrap, index, prefix, **kafka) as feed:
            await feed.catch_up(timeout)
    except BaseException:
        index.close()
        raise
    return index
