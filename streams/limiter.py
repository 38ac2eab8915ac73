"""The limiter: a transactional consume → decide → produce loop over ``<prefix>.limits`` (docs/limits.md).

Every ``legato coordinator`` process runs one, in the consumer group ``<prefix>-limiter``; the partitions of the
limits topic are shared among them. Partition ``p`` is a :class:`Shard`: the budget of every ``<limit>/<key>`` that
hashes to it (``workflows.limiter.KeyState``), loaded from partition ``p`` of the compacted changelog
``<prefix>-limiter-changelog``, and a transactional producer whose ``transactional.id`` is ``<group>-<p>``.

Each turn decides the acquisitions and releases read (``workflows.limiter.decide``, the clock passed in), then the
waiters that time alone admits now (a rate's next slot, a pause's end), and commits per shard ONE transaction with
the grants (``limit.granted`` on ``<prefix>.coordinator``, keyed by run_id), the new state of every key it changed
(a tombstone once a key is idle and its rates have recovered) and where the limits partition resumes (the
changelog's ``CHANGELOG_OFFSETS_KEY`` record). A grant is therefore visible exactly when the state that counts it
is: a process killed at any moment leaves the last committed state and offset, and the next owner fences it
(``InitProducerId`` aborts its open transaction), reads them back and decides the rest again.

The coordinators' trigger marks (``limit.triggers_decided``, ``streams/coordinator/marks.py``) arrive on every
partition; each shard keeps the latest per trigger partition in memory only (they come again every 100 ms) and
passes the lowest to ``decide``, which starts no keyed run triggered after it. A partition that reads nothing but
marks commits where it resumes every ``_MARKS_SAVED_EVERY_MS``, not per mark.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable

import msgspec
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from legato.streams import kafka_io, security
from legato.streams.kafka_io import keyed_partitioner
from legato.topics import codec
from legato.topics.codec import DecodeError
from legato.topics.limits import LimitAcquire, LimitGranted, LimitRelease, TriggersDecided
from legato.topics.names import CHANGELOG_OFFSETS_KEY, Topics
from legato.workflows import limiter
from legato.workflows.limiter import KeyState

log = logging.getLogger("legato.limiter")

_MAX_POLL = 500
_IDLE_POLL_MS = 200
"""The longest poll when no waiter is due sooner."""
_SWEEP_EVERY_MS = 5_000
"""How often idle keys whose rates have recovered are deleted (from memory, and by a tombstone from the changelog)."""
_TRANSACTION_TIMEOUT_MS = 60_000
_MARKS_SAVED_EVERY_MS = 5_000
"""How often a partition that reads nothing but trigger marks commits where it resumes (the marks themselves are
not stored: every coordinator sends them again a few times a second)."""
_RECORDS = {"limit.acquire": LimitAcquire, "limit.release": LimitRelease, "limit.triggers_decided": TriggersDecided}


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


class Shard:
    """Partition ``p`` of the limits topic: the budgets of its keys, its producer, where it resumes."""

    def __init__(self, partition: int, producer: AIOKafkaProducer, metrics: Any = None):
        self.partition = partition
        self.producer = producer
        self.metrics = metrics  # streams.metrics.Metrics, or None
        self.states: dict[str, KeyState] = {}
        self.next_offset: int | None = None  # of the limits partition; None: from its beginning
        # this turn's work, committed together
        self.grants: list[LimitGranted] = []
        self.dirty: set[str] = set()
        self.offset_moved = False
        self.swept_ms = 0
        # trigger partition → every trigger before this epoch ms is decided (TriggersDecided); not stored
        self.marks: dict[int, int] = {}
        self.trigger_partitions: int | None = None
        self.marks_unsaved = False
        self.saved_ms = 0
        self.decisions: list[tuple[KeyState, Any, list[LimitGranted]]] = []  # counted in the metrics once committed

    def decided_ms(self) -> int:
        """Every trigger before this has been decided on every trigger partition (0 until each has reported)."""
        n = self.trigger_partitions
        if n is None or any(p not in self.marks for p in range(n)):
            return 0
        return min(self.marks[p] for p in range(n))

    def marked(self, record: TriggersDecided) -> None:
        """A coordinator's trigger marks: they only move forward (a stale mark is still true)."""
        self.trigger_partitions = record.partitions
        for p, ms in record.marks.items():
            if ms > self.marks.get(p, 0):
                self.marks[p] = ms
        self.marks_unsaved = True

    def apply(self, key: str, record: LimitAcquire | LimitRelease | None, now_ms: int) -> None:
        state, grants = limiter.decide(self.states.get(key), record, now_ms, self.decided_ms())
        if self.metrics is not None and state is not None:
            # what the decision left, as it is now: later decisions of this turn change the state in place
            self.decisions.append((msgspec.structs.replace(state, holders=dict(state.holders), waiting=list(state.waiting)), record, grants))
        if state is None:
            return  # a release of a key it does not know: nothing held, nothing to give back
        self.states[key] = state
        self.dirty.add(key)
        self.grants.extend(grants)

    def tick(self, now_ms: int) -> None:
        """Grant what time alone admits now, and drop the idle keys whose rates have recovered."""
        decided = self.decided_ms()
        for key, state in self.states.items():
            if state.waiting:
                due = limiter.due_ms(state, now_ms, decided)
                if due is not None and due <= now_ms:
                    self.apply(key, None, now_ms)
        if self.marks_unsaved and now_ms - self.saved_ms >= _MARKS_SAVED_EVERY_MS:
            self.offset_moved = True
        if now_ms - self.swept_ms >= _SWEEP_EVERY_MS:
            self.swept_ms = now_ms
            for key in [k for k, s in self.states.items() if _expired(s, now_ms)]:
                del self.states[key]
                self.dirty.add(key)

    def next_due_ms(self, now_ms: int) -> int | None:
        decided = self.decided_ms()
        due = [d for s in self.states.values() if s.waiting and (d := limiter.due_ms(s, now_ms, decided)) is not None]
        return min(due) if due else None

    def committed(self, now_ms: int) -> None:
        """The turn's transaction committed: start the next, and count its decisions in the metrics (only now: a turn
        that fails is decided again by the reloaded shard, and would be counted twice)."""
        self.grants, self.dirty, self.offset_moved = [], set(), False
        self.marks_unsaved, self.saved_ms = False, now_ms
        decisions, self.decisions = self.decisions, []
        if self.metrics is not None:
            for state, record, grants in decisions:
                self.metrics.limit_decided(state, record, grants)

    def pending(self) -> bool:
        return bool(self.grants or self.dirty or self.offset_moved)


def _expired(state: KeyState, now_ms: int) -> bool:
    """Nothing held or waiting, no pause ahead and both rates back to a full burst: forgetting it changes nothing."""
    return limiter.idle(state) and state.paused_until_ms <= now_ms and state.request_tat <= now_ms and state.token_tat <= now_ms


class Limiter(ConsumerRebalanceListener):
    """Runs the limiter for one process (``legato coordinator`` starts it beside the coordinator loop)."""

    def __init__(self, bootstrap: str, topics: Topics, session_timeout_s: float = 6.0, clock: Callable[[], int] = wall_clock_ms,
                 metrics: Any = None):
        self.bootstrap = bootstrap
        self.metrics = metrics
        self.topics = topics
        self.group = topics.limiter_group
        self.clock = clock
        self.shards: dict[int, Shard] = {}
        self._session_timeout_ms = int(session_timeout_s * 1000)
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()  # held while a turn decides and commits; a revocation waits for it
        self._pending: set[int] = set()  # assigned partitions to open (fence, restore, seek)

    @property
    def consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "the limiter is not serving"
        return self._consumer

    async def serve(self) -> None:
        """Consume, decide and commit until cancelled; then leave the group so the partitions move at once."""
        kw = security.aiokafka_kwargs()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=max(100, self._session_timeout_ms // 4),
            fetch_max_wait_ms=50,
            **kw,
        )
        self._consumer.subscribe([self.topics.limits], listener=self)
        await self._consumer.start()
        try:
            await self._loop()
        finally:
            await self._consumer.stop()  # revokes (closing the shards) and leaves the group
            await self._close(list(self.shards))

    async def _loop(self) -> None:
        failures = 0
        while True:
            if self._pending:
                if await self._open_pending():
                    failures = 0
                else:
                    failures += 1
                    await asyncio.sleep(min(5.0, 0.1 * 2**failures))
            polled = await self.consumer.getmany(timeout_ms=self._poll_ms(), max_records=_MAX_POLL)
            async with self._lock:
                await self.turn(polled)

    def _poll_ms(self) -> int:
        now = self.clock()
        due = [d for shard in self.shards.values() if (d := shard.next_due_ms(now)) is not None]
        return _IDLE_POLL_MS if not due else max(0, min(_IDLE_POLL_MS, min(due) - now))

    async def turn(self, polled: dict[TopicPartition, list[Any]]) -> None:
        """Decide what was polled and what is due, and commit each shard that changed."""
        now = self.clock()
        for tp, records in polled.items():
            shard = self.shards.get(tp.partition)
            if shard is None:
                continue  # fetched before a revocation: the new owner reads it again
            for msg in records:
                record = self._decode(msg)
                shard.next_offset = msg.offset + 1
                if isinstance(record, TriggersDecided):
                    shard.marked(record)  # its offset is committed with the next change, or within 5 s
                    continue
                if record is not None:
                    shard.apply(msg.key.decode() if msg.key else "", record, now)
                shard.offset_moved = True
        for shard in list(self.shards.values()):
            shard.tick(now)
            if shard.pending():
                try:
                    await self._commit(shard, now)
                except Exception as exc:  # fenced, or the broker went away: reload the shard from the changelog
                    log.warning("limits partition %d: commit failed (%s: %s); reloading it", shard.partition, type(exc).__name__, exc)
                    await self._reload(shard.partition)

    def _decode(self, msg: Any) -> LimitAcquire | LimitRelease | TriggersDecided | None:
        try:
            raw = codec.decode_object(msg.value)
            model = _RECORDS.get(raw.get("type"))
            if model is None:
                raise DecodeError(f"not a limit record: type {raw.get('type')!r}")
            return codec.validate(model, raw)
        except DecodeError as exc:
            # only coordinators write here; a foreign record is skipped, not allowed to stop every key of the partition
            log.warning("limits %d@%d: skipped (%s)", msg.partition, msg.offset, exc)
            return None

    async def _commit(self, shard: Shard, now_ms: int) -> None:
        producer = shard.producer
        changelog = self.topics.limits_changelog
        async with kafka_io.transaction(producer):  # on any failure the shard is rebuilt with a fresh producer
            futures = [await producer.send(self.topics.coordinator, codec.dumps(g), key=g.run_id.encode()) for g in shard.grants]
            for key in shard.dirty:
                state = shard.states.get(key)
                value = None if state is None else state.encoded()
                futures.append(await producer.send(changelog, value, key=key.encode(), partition=shard.partition))
            if shard.next_offset is not None:
                offsets = orjson.dumps({"offset": shard.next_offset})
                futures.append(await producer.send(changelog, offsets, key=CHANGELOG_OFFSETS_KEY, partition=shard.partition))
            for fut in futures:
                await fut  # aiokafka would commit a transaction in which a record failed
        shard.committed(now_ms)

    # --- partitions assigned and revoked ------------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Close the revoked shards once the turn in hand has committed; what they decided since is not committed,
        so the next owner decides it again."""
        async with self._lock:
            partitions = {tp.partition for tp in revoked}
            self._pending -= partitions
            await self._close(sorted(partitions & set(self.shards)))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        """Leave the new partitions paused for the loop to open (this callback runs without heartbeats)."""
        tps = [tp for tp in assigned if tp.partition not in self.shards]
        self._pending |= {tp.partition for tp in tps}
        if tps:
            self.consumer.pause(*tps)

    async def _open_pending(self) -> bool:
        async with self._lock:
            for p in sorted(self._pending):
                try:
                    await self._open(p)
                except Exception as exc:
                    log.warning("limits partition %d: cannot open it (%s: %s); trying again", p, type(exc).__name__, exc)
                    return False
                self._pending.discard(p)
                self.consumer.resume(TopicPartition(self.topics.limits, p))
        return True

    async def _open(self, p: int) -> None:
        """Fence the previous owner, load the partition's budgets and offset from the changelog, seek."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            transactional_id=f"{self.group}-{p}",
            acks="all",
            transaction_timeout_ms=_TRANSACTION_TIMEOUT_MS,
            linger_ms=0,
            partitioner=keyed_partitioner,
            **security.aiokafka_kwargs(),
        )
        shard = Shard(p, producer, self.metrics)
        try:
            await producer.start()  # InitProducerId: aborts the dead owner's open transaction, fences it for good
            await self._restore(shard)
        except BaseException:
            await producer.stop()
            raise
        tp = TopicPartition(self.topics.limits, p)
        if shard.next_offset is None:
            await self.consumer.seek_to_beginning(tp)
        else:
            self.consumer.seek(tp, shard.next_offset)
        self.shards[p] = shard
        waiting = sum(len(s.waiting) for s in shard.states.values())
        log.info("limits partition %d: %d keys loaded (%d waiters) from offset %s", p, len(shard.states), waiting, shard.next_offset)

    async def _restore(self, shard: Shard) -> None:
        def put(record: Any) -> None:
            if record.key == CHANGELOG_OFFSETS_KEY:
                shard.next_offset = int(orjson.loads(record.value)["offset"])
            elif record.value is None:
                shard.states.pop(record.key.decode(), None)
            else:
                shard.states[record.key.decode()] = KeyState.decoded(record.value)

        reader = kafka_io.reader(self.bootstrap, **security.aiokafka_kwargs())
        try:
            await reader.start()
            await kafka_io.read_partition(reader, TopicPartition(self.topics.limits_changelog, shard.partition), put)
        finally:
            await reader.stop()

    async def _reload(self, p: int) -> None:
        await self._close([p])
        tp = TopicPartition(self.topics.limits, p)
        if tp in self.consumer.assignment():
            self._pending.add(p)
            self.consumer.pause(tp)

    async def _close(self, partitions: list[int]) -> None:
        for p in partitions:
            shard = self.shards.pop(p, None)
            if shard is None:
                continue
            if self.metrics is not None:  # its keys' use is reported by their next owner
                self.metrics.limits_dropped((state.limit, state.key) for state in shard.states.values())
            try:
                await shard.producer.stop()
            except Exception as exc:
                log.warning("limits partition %d: closing its producer failed: %s", p, exc)

    def usage(self) -> dict[str, dict[str, Any]]:
        """What each key this process owns uses now (``<limit>/<key>`` → ``workflows.limiter.usage``)."""
        return {key: limiter.usage(state) for shard in self.shards.values() for key, state in shard.states.items()}
