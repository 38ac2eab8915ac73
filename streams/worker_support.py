"""Worker-side controls: cancellations, the shared result cache, rate limits and request batching.

Each keeps to one worker process; what must be shared (cancellations, cached results) travels on Kafka topics.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable

import orjson

from legato.streams import kafka_io, security
from legato.topics import codec
from legato.topics.codec import DecodeError
from legato.topics.models import ActivityRequested, RequestCancelled

log = logging.getLogger("legato.worker")


class BoundedSet:
    """The most recent ``size`` ids, oldest dropped first."""

    def __init__(self, size: int = 100_000):
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, item: str) -> bool:
        """Add ``item``; False when it was already there."""
        if item in self._ids:
            return False
        self._ids[item] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return True

    def __contains__(self, item: str) -> bool:
        return item in self._ids


async def tail_topic(bootstrap: str, topic: str, on_record: Callable[[bytes | None, bytes | None], None], from_beginning: bool, ready: asyncio.Event | None = None, **kafka: Any) -> None:
    """Read every partition of ``topic`` without a consumer group (each process sees everything)."""
    consumer = kafka_io.reader(bootstrap, from_beginning=from_beginning, **{**security.aiokafka_kwargs(), **kafka})
    await consumer.start()
    try:
        if not await kafka_io.assign_all(consumer, [topic], from_beginning=from_beginning, wait=20.0):
            log.warning("topic %s not found; not reading it", topic)
            return
        if ready is not None:
            ready.set()
        async for msg in consumer:
            on_record(msg.key, msg.value)
    finally:
        await consumer.stop()


class Cancellations:
    """Requests the coordinator no longer waits for: skipped when queued, cancelled when running."""

    def __init__(self) -> None:
        self.cancelled = BoundedSet()
        self.running: dict[str, asyncio.Task] = {}

    def on_record(self, key: bytes | None, value: bytes | None) -> None:
        try:
            cancel = codec.decode(RequestCancelled, value)
        except DecodeError:
            return
        self.cancelled.add(cancel.request_id)
        task = self.running.get(cancel.request_id)
        if task is not None:
            task.cancel()


class ResultCache:
    """Results by fingerprint, read from the compacted cache topic (shared by all processes, survives restarts)."""

    def __init__(self, max_entries: int = 100_000):
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._max = max_entries

    def on_record(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        k = key.decode("utf-8", "replace")
        if value is None:
            self._entries.pop(k, None)
            return
        try:
            entry = orjson.loads(value)
        except orjson.JSONDecodeError:
            return
        if isinstance(entry, dict) and "stored_ms" in entry:
            self._entries[k] = entry
            self._entries.move_to_end(k)
            if len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def get(self, key: str, ttl_ms: int, now_ms: int) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is None or int(entry["stored_ms"]) + ttl_ms <= now_ms:  # fresh while stored_ms + ttl is after now, as in the coordinator
            return None
        return entry


class TokenBucket:
    """At most ``rate`` starts per second on average, bursts up to one second's worth.

    ``clock`` (seconds) and ``sleep`` are the event loop's by default; tests pass a virtual clock and a sleep that
    advances it."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep):
        self.rate = rate
        self.tokens = max(1.0, rate)
        self._clock = clock
        self._sleep = sleep
        self.updated = clock()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        async with self._lock:  # FIFO: waiting requests start in arrival order
            while True:
                now = self._clock()
                self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await self._sleep((1 - self.tokens) / self.rate)


class RateLimits:
    """The token buckets of one worker process: one per activity and declared rate.

    Requests of an activity that carry the same rate share a bucket; steps that declare different rates for one
    activity (one per model, say) are limited separately, each to its own rate. (One bucket per activity, replaced
    whenever the rate changed, refilled the burst at every change: mixed traffic was not limited at all.)"""

    def __init__(self, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self._buckets: dict[tuple[str, float], TokenBucket] = {}
        self._clock = clock
        self._sleep = sleep

    async def take(self, activity: str, rate: float) -> None:
        """Wait until a request of ``activity`` that carries ``rate`` may start."""
        bucket = self._buckets.get((activity, rate))
        if bucket is None:
            bucket = self._buckets[(activity, rate)] = TokenBucket(rate, self._clock, self._sleep)
        await bucket.take()


class Batcher:
    """Collects requests of one activity into lists of up to ``max_size``, waiting at most ``max_wait``."""

    def __init__(self, call: Callable[[list[Any]], Awaitable[list[Any]]]):
        self._call = call
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, payload: Any, max_size: int, max_wait: float) -> Any:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((payload, fut))
        if len(self._pending) >= max_size:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(max_wait, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            asyncio.ensure_future(self._run(batch))

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = await self._call([payload for payload, _ in batch])
            if not isinstance(results, list) or len(results) != len(batch):
                raise TypeError(f"a batch handler must return a list of {len(batch)} results, got {type(results).__name__}")
        except BaseException as exc:  # every waiting request gets the batch's failure
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            return
        for (_, fut), result in zip(batch, results):
            if not fut.done():
                fut.set_result(result)


def batch_settings(request: ActivityRequested) -> tuple[int, float] | None:
    if not request.batch:
        return None
    return int(request.batch.get("max_size", 1)), float(request.batch.get("max_wait_ms", 50)) / 1000
