"""Fires schedules (``workflows.schedule`` decides; this reads and writes Kafka).

Every coordinator process reads all of ``<prefix>.schedules`` (compacted, small) and the schedules' run events on
``<prefix>.runs``; a schedule is fired by the process that owns the coordinator partition its name hashes to, so
one process fires it at a time, and a process that takes the partition over goes on from the last tick recorded.

Exactly one run per tick, across SIGKILLs: a tick's trigger (``run.requested`` with the run_id derived from the
schedule's name and the tick) is acknowledged by the broker before the ``schedule.fired`` record that moves
``last_tick_ms`` past it is written. A process killed in between leaves the tick unrecorded, and whoever owns the
partition next fires it again with the same run_id: the coordinator ignores a trigger for a run_id it has
(``duplicate_trigger``). A takeover that has not yet read the last ``schedule.fired`` of the process it replaces
fires the same ticks again, with the same effect. A tick is never recorded before its trigger is on the broker, so
no tick within ``catchup`` is missed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from aiokafka import AIOKafkaProducer, TopicPartition

from legato.streams import kafka_io, security
from legato.streams.kafka_io import keyed_partitioner, partition_for
from legato.streams.worker_support import tail_topic
from legato.topics import codec
from legato.topics.codec import DecodeError
from legato.topics.models import RunEvent, RunRequested
from legato.topics.names import Topics
from legato.workflows.schedule import ScheduleFired, ScheduleSpec, due, run_id

log = logging.getLogger("legato.schedules")

FIRED_SUFFIX = b"\x00fired"
"""The key of a schedule's ``schedule.fired`` record is its name followed by this (names have no NUL)."""

RUNS_LOOKBACK_S = 24 * 3600.0
"""How far back a coordinator reads ``<prefix>.runs`` at start to know which schedule runs are still going
(``overlap``): a run started earlier than that and still going counts as finished."""

PENDING_S = 60.0
"""A run fired but not yet seen started counts as going for this long (its ``run.started`` is on its way)."""

_STAMP = len("20261207T080000.000Z")


def schedule_of(run: str) -> str | None:
    """The schedule a run_id was fired for (``sched-<name>-<stamp>``), or None."""
    if not run.startswith("sched-") or len(run) < len("sched-") + _STAMP + 2 or run.startswith("sched-manual-"):
        return None
    return run[len("sched-"):-_STAMP - 1]


class ScheduleTable:
    """Every schedule and its last ``schedule.fired``, from ``<prefix>.schedules`` (what the CLI and console read too)."""

    def __init__(self) -> None:
        self.specs: dict[str, ScheduleSpec] = {}
        self.fired: dict[str, ScheduleFired] = {}

    def on_record(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        if key.endswith(FIRED_SUFFIX):
            name = key[: -len(FIRED_SUFFIX)].decode("utf-8", "replace")
            if value is None:
                self.fired.pop(name, None)
                return
            try:
                record = codec.validate(ScheduleFired, codec.decode_object(value))
            except DecodeError as exc:
                log.warning("bad schedule.fired record for %s: %s", name, exc)
                return
            known = self.fired.get(name)
            if known is None or known.created_ms != record.created_ms or record.last_tick_ms >= known.last_tick_ms:
                self.fired[name] = record  # a zombie's older record never moves a schedule back
            return
        name = key.decode("utf-8", "replace")
        if value is None:
            self.specs.pop(name, None)
            return
        try:
            self.specs[name] = codec.validate(ScheduleSpec, codec.decode_object(value))
        except DecodeError as exc:
            log.warning("bad schedule.defined record for %s: %s", name, exc)


async def read_table(bootstrap: str, topics: Topics, **kafka: Any) -> ScheduleTable:
    """The schedules as they are now (read to the end of ``<prefix>.schedules``)."""
    table = ScheduleTable()
    consumer = kafka_io.reader(bootstrap, **{**security.aiokafka_kwargs(), **kafka})
    await consumer.start()
    try:
        for p in await kafka_io.partitions_of(consumer, topics.schedules, wait=5.0):
            await kafka_io.read_partition(consumer, TopicPartition(topics.schedules, p), lambda m: table.on_record(m.key, m.value), timeout=30.0)
    finally:
        await consumer.stop()
    return table


class Schedules:
    """The firing loop of one coordinator process: ``owns(partition)`` says whether this process owns a partition."""

    def __init__(self, bootstrap: str, topics: Topics, partitions: int, owns: Callable[[int], bool], metrics: Any = None,
                 clock: Callable[[], float] = time.time, interval: float = 0.25):
        self.bootstrap = bootstrap
        self.topics = topics
        self.partitions = partitions
        self.owns = owns
        self.metrics = metrics
        self.clock = clock
        self.interval = interval
        self.table = ScheduleTable()
        self.active: dict[str, set[str]] = {}  # schedule -> its runs seen started and not finished
        self.pending: dict[str, float] = {}  # run_id fired -> when (until its run.started is seen)

    def owner(self, name: str) -> int:
        return partition_for(name.encode(), self.partitions)

    def running(self, name: str, now: float) -> bool:
        if self.active.get(name):
            return True
        return any(schedule_of(r) == name and now - at < PENDING_S for r, at in self.pending.items())

    def on_run_event(self, key: bytes | None, value: bytes | None) -> None:
        if key is None or not key.startswith(b"sched-") or value is None:
            return
        try:
            event = codec.decode(RunEvent, value)
        except DecodeError:
            return
        name = schedule_of(event.run_id)
        if name is None:
            return
        self.pending.pop(event.run_id, None)
        runs = self.active.setdefault(name, set())
        if event.status == "running":
            runs.add(event.run_id)
        else:
            runs.discard(event.run_id)

    async def run(self) -> None:
        """Read the schedules and fire the due ticks of the ones this process owns, until cancelled."""
        kw = security.aiokafka_kwargs()
        while True:  # nothing fires before the table is read to its end: an unread schedule.fired would refire ticks
            try:
                self.table = await read_table(self.bootstrap, self.topics)
                break
            except Exception as exc:
                log.warning("reading %s failed, trying again: %s", self.topics.schedules, exc)
                await asyncio.sleep(1.0)
        runs = asyncio.create_task(self._tail_runs(kw), name="legato.schedules.runs")
        specs = asyncio.create_task(self._tail_schedules(kw), name="legato.schedules.table")
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=True, linger_ms=0, partitioner=keyed_partitioner, **kw)
        await producer.start()
        try:
            while True:
                try:
                    await self.fire_due(producer)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the broker is away: the ticks stay unrecorded and are fired next turn
                    log.warning("firing schedules failed: %s", exc)
                await asyncio.sleep(self.interval)
        finally:
            runs.cancel()
            specs.cancel()
            await asyncio.gather(runs, specs, return_exceptions=True)
            await producer.stop()

    async def fire_due(self, producer: AIOKafkaProducer) -> None:
        """One turn: decide every owned schedule at the clock's now, and carry the decisions out."""
        now = self.clock()
        now_ms = int(now * 1000)
        for name, spec in list(self.table.specs.items()):
            if not self.owns(self.owner(name)):
                continue
            fired = self.table.fired.get(name)
            if fired is not None and fired.created_ms != spec.created_ms:
                fired = None  # the record of a schedule deleted and created again under this name
            decision = due(spec, fired, now_ms, self.running(name, now))
            if not decision.changed and decision.buffered_tick_ms == (fired.buffered_tick_ms if fired is not None else None):
                continue
            last_run = fired.last_run_id if fired is not None else None
            sent = []
            for tick in decision.fire:  # sent together, acknowledged before the record: a catch-up is one round trip
                rid = run_id(name, tick)
                trigger = RunRequested(workflow=spec.workflow, input=spec.input, run_id=rid, correlation_id=f"schedule:{name}")
                sent.append(await producer.send(self.topics.triggers, codec.dumps(trigger), key=rid.encode()))
                last_run = rid
            for future in sent:
                await future
            for tick in decision.fire:
                self.pending[run_id(name, tick)] = now
                if self.metrics is not None:
                    self.metrics.schedule_fired(name, now_ms - tick)
            record = ScheduleFired(name=name, created_ms=spec.created_ms, last_tick_ms=decision.last_tick_ms, last_run_id=last_run,
                                   buffered_tick_ms=decision.buffered_tick_ms)
            await producer.send_and_wait(self.topics.schedules, codec.dumps(record), key=fired_key(name))
            self.table.fired[name] = record
            if self.metrics is not None:
                if decision.skipped_late:
                    self.metrics.schedule_skipped(name, "late", decision.skipped_late)
                if decision.skipped_paused:
                    self.metrics.schedule_skipped(name, "paused", decision.skipped_paused)
                if decision.skipped_overlap:
                    self.metrics.schedule_skipped(name, "overlap", len(decision.skipped_overlap))
        for rid, at in list(self.pending.items()):
            if now - at >= PENDING_S:
                del self.pending[rid]

    async def _tail_schedules(self, kw: dict[str, Any]) -> None:
        await tail_topic(self.bootstrap, self.topics.schedules, self.table.on_record, from_beginning=True, **kw)

    async def _tail_runs(self, kw: dict[str, Any]) -> None:
        consumer = kafka_io.reader(self.bootstrap, **kw)
        await consumer.start()
        try:
            if not await kafka_io.assign_all(consumer, [self.topics.runs], from_beginning=True, wait=20.0):
                log.warning("topic %s not found; overlap sees no runs", self.topics.runs)
                return
            tps = list(consumer.assignment())
            since = await consumer.offsets_for_times({tp: int((self.clock() - RUNS_LOOKBACK_S) * 1000) for tp in tps})
            for tp in tps:
                found = since.get(tp)
                if found is not None:
                    consumer.seek(tp, found.offset)
                else:
                    await consumer.seek_to_end(tp)
            async for msg in consumer:
                self.on_run_event(msg.key, msg.value)
        finally:
            await consumer.stop()


def fired_key(name: str) -> bytes:
    """The key of ``name``'s ``schedule.fired`` record."""
    return name.encode() + FIRED_SUFFIX
