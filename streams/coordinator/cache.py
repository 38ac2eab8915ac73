"""The result cache, served by the coordinator: a ``cache: {ttl}`` step's identical request is answered without a
worker hop, whichever worker (Legato's, or one in another language that knows nothing of the cache) serves the
activity.

The store is the compacted topic ``<prefix>.cache``: key the request's fingerprint (``legato.topics.cache``), value a
:class:`~legato.topics.models.CachedResult` ``{"output", "confidence", "stored_ms"}``. Every coordinator process
reads the whole topic from its start and keeps following it (no consumer group, like the DefinitionTable), so an
entry written by any coordinator or worker is a hit for all of them, and a restarted process rebuilds the same
table from the log. Nothing else holds the cache.

Writing: when the state machine decides a successful completion of a cache step that did not come from the cache,
it emits ``CacheResult``; the partition's batch writes the entry in its transaction (``effects.carry_out``), so the
entry is visible exactly when the decision that caused it is.

Serving: when the machine asks for a ``RequestActivity`` with ``cache_ttl_ms`` and the table holds an entry with
``stored_ms + ttl > now``, the batch does not send the request: it produces an ``ActivityCompleted`` with
``"cached": true`` (the request's request_id, run_id, step_id and attempt) to ``<prefix>.completions`` in the same
transaction. That completion is then read and decided like any worker's: the state machine stays pure (it never
sees the table), the hit is in the log (``legato runs show``, the console and replays see an ordinary cached
completion), and a crash at any moment is harmless — before the commit nothing of the batch is visible and its
records are decided again (then a hit or a miss, either is correct); after it the completion is durable and the
request is pending in the run's state, with its timeout armed, until the completion is decided. Deciding the hit
at once inside the batch would save one poll (a few ms) but would feed an event that is in no topic into the
machine, outside the offset bookkeeping that makes every decision happen exactly once.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, Callable

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from legato.streams import kafka_io
from legato.streams.coordinator.inbox import Send
from legato.streams.coordinator.timers import now_ms
from legato.topics import codec
from legato.topics.cache import fingerprint
from legato.topics.codec import DecodeError
from legato.topics.models import ActivityCompleted, ActivityRequested, CachedResult
from legato.topics.names import Topics
from legato.workflows.commands import CacheResult

log = logging.getLogger("legato.coordinator")

MAX_ENTRIES = 100_000
"""Entries a table keeps, the least recently written dropped first (a dropped entry is a miss, never wrong)."""

_FOLLOW_POLL_MS = 200
"""How long one poll of the following table waits (an entry written by another process is seen within about this)."""


class ResultTable:
    """Every entry of the cache topic by fingerprint: a view of the log, rebuilt from its start by each process.

    ``answer`` is the hit-or-miss decision for one request; ``metrics`` (optional) counts it per workflow and step.
    """

    def __init__(self, bootstrap: str, topics: Topics, *, kafka: dict[str, Any] | None = None, metrics: Any = None,
                 clock: Callable[[], int] = now_ms, max_entries: int = MAX_ENTRIES):
        self.bootstrap = bootstrap
        self.topics = topics
        self.metrics = metrics
        self._clock = clock
        self._max = max_entries
        self._kafka = dict(kafka or {})
        self._entries: OrderedDict[str, CachedResult] = OrderedDict()
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []
        self._follow: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._entries)

    # --- the table -----------------------------------------------------------------------------

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """One record of the topic: an entry, a tombstone (the entry goes), or something unusable (skipped)."""
        if key is None:
            return
        fp = key.decode("utf-8", "replace")
        if value is None:
            self._entries.pop(fp, None)
            return
        try:
            entry = codec.decode(CachedResult, value)
        except DecodeError as exc:
            log.info("skipped a record of %s: %s", self.topics.cache, exc)
            return
        self._entries[fp] = entry
        self._entries.move_to_end(fp)
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def fresh(self, fp: str, ttl_ms: int, now: int) -> CachedResult | None:
        """The entry under ``fp`` while ``stored_ms + ttl_ms`` is after ``now``; None when missing or expired."""
        entry = self._entries.get(fp)
        if entry is None or entry.stored_ms + ttl_ms <= now:
            return None
        return entry

    def answer(self, request: ActivityRequested) -> ActivityCompleted | None:
        """The cached completion that answers ``request`` (a hit), or None: no cache on the step, or a miss."""
        if not request.cache_ttl_ms:
            return None
        entry = self.fresh(fingerprint(request.activity, request.input), request.cache_ttl_ms, self._clock())
        if self.metrics is not None:
            self.metrics.cache_lookup(request.workflow or "", request.step_id, entry is not None)
        if entry is None:
            return None
        return ActivityCompleted(request_id=request.request_id, run_id=request.run_id, step_id=request.step_id, attempt=request.attempt,
                                 status="succeeded", output=entry.output, confidence=entry.confidence, cached=True)

    # --- following the topic -------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Read the topic from its start up to its end, then keep reading it in the background."""
        self._consumer = kafka_io.reader(self.bootstrap, **self._kafka)
        try:
            await self._consumer.start()
            self._partitions = await kafka_io.assign_all(self._consumer, [self.topics.cache], from_beginning=True, wait=timeout, missing=_missing)
            await self._catch_up(timeout)
        except BaseException:
            await self.stop()
            raise
        self._follow = asyncio.create_task(self._follow_loop(), name="legato-cache")

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            try:
                await self._follow
            except asyncio.CancelledError:
                pass
            self._follow = None
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def _catch_up(self, timeout: float) -> None:
        """Read until the end offsets of now (the last stable offsets: read_committed)."""
        assert self._consumer is not None
        consumer = self._consumer
        ends = await consumer.end_offsets(self._partitions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any([await consumer.position(tp) < ends[tp] for tp in self._partitions]):
            if loop.time() > deadline:
                raise TimeoutError(f"reading {self.topics.cache} took longer than {timeout:g}s")
            self._apply_batch(await consumer.getmany(timeout_ms=_FOLLOW_POLL_MS))

    async def _follow_loop(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=_FOLLOW_POLL_MS)
            except Exception as exc:  # the broker is away: the consumer reconnects; keep our position
                log.warning("reading %s: %s", self.topics.cache, exc)
                await asyncio.sleep(1.0)
                continue
            self._apply_batch(batch)

    def _apply_batch(self, batch: dict[TopicPartition, list[Any]]) -> None:
        for records in batch.values():
            for record in records:
                self.apply(record.key, record.value)


def entry_record(command: CacheResult, topics: Topics) -> Send:
    """The ``legato.cache`` record of a ``CacheResult``: keyed by the fingerprint, every field present."""
    key = fingerprint(command.activity, command.input).encode()
    return (topics.cache, key, orjson.dumps(command.result.model_dump(mode="json")), None)


def _missing(topic: str) -> None:
    raise RuntimeError(f"topic {topic} does not exist (it is created by the coordinator at start)")
