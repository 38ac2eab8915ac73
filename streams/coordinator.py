"""The coordinator: a transactional consume → decide → produce loop over the run-keyed input.

Per input partition ``p`` (the triggers, coordinator and completions topics, co-partitioned by run_id) there is one
task: the run table of ``p`` (loaded from partition ``p`` of the changelog when the task is assigned) and one
transactional producer whose ``transactional.id`` is ``<group>-<p>``. Each batch a task reads is decided by
``legato.workflows.machine`` and then committed in ONE Kafka transaction holding everything it caused: the requests,
run events, cancellations and child records it produced, the new state of every run it touched (changelog), any
dead letters, and the input offsets. Either all of it becomes visible to ``read_committed`` consumers or none of it.

Killing the process at any moment therefore loses nothing and repeats nothing: the next owner of ``p`` starts a
producer with the same ``transactional.id``, which fences the dead one and aborts its open transaction, then loads
the changelog and resumes from the committed offsets. faust's own ``exactly_once`` mode lost runs in our kill tests
and its at-least-once mode acknowledges records fetched before a rebalance (RELIABILITY.md); this loop is why the
coordinator uses aiokafka directly. The activity workers stay on faust.
"""
from __future__ import annotations

import asyncio
import ctypes
import heapq
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.partitioner import DefaultPartitioner

from legato.streams import security
from legato.streams.dlq import dead_letter
from legato.streams.metrics import count_in_flight
from legato.topics import codec
from legato.topics.codec import DecodeError
from legato.topics.models import ActivityCompleted, ChildRunFinished, RunAccepted, RunCancelRequested, RunRequested, TimerFired
from legato.topics.names import Topics
from legato.workflows import keys
from legato.workflows.machine import (
    CancelChildRun,
    CancelRequest,
    EventIgnored,
    Machine,
    NotifyParent,
    PublishRunEvent,
    RequestActivity,
    StartChildRun,
    StartTimer,
    outstanding,
)
from legato.workflows.model import CompiledWorkflow
from legato.workflows.state import RunState

log = logging.getLogger("legato.coordinator")

_DECODED_STATES = 1_000
"""Decoded run states kept between events (keyed by the exact bytes in the table, so never stale)."""

_RUN_ID_NAMESPACE = uuid.UUID("6f1c5a3e-8d0b-4c1e-9b7a-1e2d3c4b5a69")

_MAX_POLL = 2_000
"""Records per poll."""

_MAX_QUEUED = 500
"""Records queued for one partition before its fetching pauses (while its transaction commits). It also bounds a
transaction's size, and with it the memory that eight partitions' batches in flight hold at once (at 4,000 the
coordinator's RSS grew by 6.14 KiB per run in the 100,000-run memory benchmark; BENCHMARKS.md)."""

_TRANSACTION_TIMEOUT_MS = 60_000
"""A transaction left open by a process that died without a successor blocks read_committed readers this long (a
successor aborts it at once). Shorter would let the broker abort a live transaction stuck behind a broker restart."""


_TRANSACTION_RETRY_BACKOFF_MS = 20
"""aiokafka's default (100 ms) also paces CONCURRENT_TRANSACTIONS retries: most of the p99 overhead (BENCHMARKS.md)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def run_id_for(topic: str, partition: int, offset: int) -> str:
    """A trigger without a run_id gets one derived from its position, so a redelivered trigger gets the same."""
    return str(uuid.uuid5(_RUN_ID_NAMESPACE, f"{topic}:{partition}:{offset}"))


async def _trim_heap(interval: float = 5.0) -> None:
    """Give freed heap memory back to the OS every few seconds (glibc's ``malloc_trim``). Batches in flight are
    freed between run states that live on, and glibc keeps such holes: without this the coordinator's RSS grew
    by 3.75 KiB per run in flight instead of the states' own size (BENCHMARKS.md, memory)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim
    except (OSError, AttributeError):
        return  # not glibc
    while True:
        await asyncio.sleep(interval)
        libc.malloc_trim(0)


class Timers:
    """Pending timers in memory; the run table is the truth, rescanned whenever a partition is assigned."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, str, str]] = []
        self._scheduled: set[tuple[str, str]] = set()

    def schedule(self, run_id: str, timer_id: str, due_ms: int) -> None:
        if (run_id, timer_id) not in self._scheduled:
            self._scheduled.add((run_id, timer_id))
            heapq.heappush(self._heap, (due_ms, run_id, timer_id))

    def due(self, now: int) -> list[tuple[str, str]]:
        fired = []
        while self._heap and self._heap[0][0] <= now:
            _, run_id, timer_id = heapq.heappop(self._heap)
            self._scheduled.discard((run_id, timer_id))
            fired.append((run_id, timer_id))
        return fired


class _Store:
    """One partition's run table: run_id bytes → state bytes, in memory or on disk (rocksdict)."""

    def __init__(self, path: Path | None):
        self._path = path
        if path is None:
            self._data: Any = {}
        else:
            from rocksdict import Rdict

            path.parent.mkdir(parents=True, exist_ok=True)  # before destroy: rocksdb cannot lock in a missing dir
            Rdict.destroy(str(path))  # rebuilt from the changelog, which is the truth
            self._data = Rdict(str(path))

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self._data[key] = value

    def values(self) -> Iterable[bytes]:
        return self._data.values()

    def close(self) -> None:
        if self._path is not None:
            self._data.close()


@dataclass
class _Batch:
    """What one turn of a partition's task decided, committed in one transaction."""

    sends: list[tuple[str, bytes | None, bytes, int | None]] = field(default_factory=list)  # topic, key, value, partition
    changed: dict[str, RunState] = field(default_factory=dict)  # runs this batch changed, encoded once at its end
    written: dict[bytes, bytes] = field(default_factory=dict)  # run key → the state bytes this batch stores
    running: int = 0  # runs started minus runs finished
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    timers: list[StartTimer] = field(default_factory=list)
    overheads: list[str] = field(default_factory=list)  # workflow of each completion that requested the next activity


class _Poisoned(Exception):
    """The state machine raised on a record: a bug. The batch is dropped and read again, without that record."""

    def __init__(self, position: tuple[str, int, int], reason: str):
        super().__init__(reason)
        self.position = position
        self.reason = reason


class _Task:
    """Input partition ``p``: its run table, its transactional producer, where each input topic resumes."""

    def __init__(self, partition: int, producer: AIOKafkaProducer, store: _Store):
        self.partition = partition
        self.producer = producer
        self.store = store
        self.next_offset: dict[TopicPartition, int] = {}
        self.running = 0
        self.timers = Timers()  # fired only while the task is active (not while it is parked in a rebalance)
        self.inbox: list[tuple[TopicPartition, list[Any], float]] = []  # polled, not yet decided
        self.queued = 0
        self.wake = asyncio.Event()
        self.busy = asyncio.Lock()  # held while a batch is decided and committed
        self.loop: asyncio.Task | None = None
        self.paused = False


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, coordinator: "Coordinator"):
        self.c = coordinator

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.c._revoke(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.c._assign(assigned)


class Coordinator:
    """Runs the transactional coordinator loop for one process (several processes share the partitions)."""

    def __init__(self, settings: Any, workflows: dict[str, CompiledWorkflow], metrics: Any = None):
        self.settings = settings
        self.topics: Topics = settings.topics
        self.machine = Machine(workflows)
        self.partitions: int = settings.partitions
        self.metrics = metrics
        if metrics is not None:
            metrics.declare(workflows)  # every declared choice path exists at 0: dead paths show
        self.group = self.topics.coordinator_group
        self.changelog = self.topics.changelog
        self.tasks: dict[int, _Task] = {}
        self._states: OrderedDict[str, tuple[bytes, RunState]] = OrderedDict()
        self._partitioner = DefaultPartitioner()
        self._lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._timer_producer: AIOKafkaProducer | None = None
        self._parked: dict[int, _Task] = {}
        self._parked_as: tuple[Any, Any] = (None, None)  # (member id, generation) when the tasks were parked
        self._pending: set[int] = set()  # assigned partitions to open (or reopen) from the consume loop
        self._poisoned: dict[tuple[str, int, int], str] = {}  # (topic, partition, offset) → why it is dead-lettered
        self._session_timeout_ms = int(float(os.environ.get("LEGATO_SESSION_TIMEOUT", "10")) * 1000)

    # --- lifecycle ----------------------------------------------------------------------------

    async def serve(self) -> None:
        """Consume, decide and commit until cancelled; then leave the group so the partitions move at once."""
        kw = security.aiokafka_kwargs()
        self._timer_producer = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap, enable_idempotence=True, linger_ms=0, **kw)
        await self._timer_producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            partition_assignment_strategy=(RangePartitionAssignor,),  # co-partitions the three input topics
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=max(100, self._session_timeout_ms // 4),
            fetch_max_wait_ms=100,
            **kw,
        )
        self._consumer.subscribe([self.topics.triggers, self.topics.coordinator, self.topics.completions], listener=_Rebalance(self))
        await self._consumer.start()
        timers = asyncio.create_task(self._fire_timers(), name="legato.fire_timers")
        gauge = asyncio.create_task(self._report_in_flight(), name="legato.runs_in_flight") if self.metrics is not None else None
        trim = asyncio.create_task(_trim_heap(), name="legato.trim_heap")
        try:
            await self._consume()
        finally:
            timers.cancel()
            trim.cancel()
            if gauge is not None:
                gauge.cancel()
            loops = [t.loop for t in self.tasks.values() if t.loop is not None]
            for loop in loops:
                loop.cancel()  # a batch being committed is aborted: whoever owns the partition next reads it again
            await asyncio.gather(*loops, return_exceptions=True)
            await self._consumer.stop()  # revokes and leaves the group
            self._parked.update(self.tasks)
            self.tasks.clear()
            await self._close_parked()
            await self._timer_producer.stop()

    async def _consume(self) -> None:
        """Poll, and hand each partition's records to its task; each task decides and commits on its own, so one
        partition's transaction never holds up another's records."""
        assert self._consumer is not None
        failures = 0
        while True:
            if self._pending:
                if await self._open_pending():
                    failures = 0
                else:  # the broker is away: the other partitions keep going, this one is tried again
                    failures += 1
                    await asyncio.sleep(min(5.0, 0.1 * 2**failures))
            polled = await self._consumer.getmany(timeout_ms=200, max_records=_MAX_POLL)
            received = time.perf_counter()
            for tp, records in polled.items():
                task = self.tasks.get(tp.partition)
                if task is None:
                    continue  # fetched before a revocation (the new owner reads them) or while it reloads
                task.inbox.append((tp, records, received))
                task.queued += len(records)
                task.wake.set()
                if task.queued >= _MAX_QUEUED and not task.paused:
                    task.paused = True
                    self._consumer.pause(*self._assigned(task.partition))

    async def _run_task(self, task: _Task) -> None:
        """Decide and commit the task's queued records, one transaction per turn, until the task is closed."""
        assert self._consumer is not None
        while self.tasks.get(task.partition) is task:
            await task.wake.wait()
            async with task.busy:
                task.wake.clear()
                if self.tasks.get(task.partition) is not task:
                    return
                parts, task.inbox, task.queued = task.inbox, [], 0
                if parts:
                    await self._process(task, parts)
                if task.paused and self.tasks.get(task.partition) is task:
                    task.paused = False
                    self._consumer.resume(*self._assigned(task.partition))

    def _assigned(self, p: int) -> list[TopicPartition]:
        assert self._consumer is not None
        return [tp for tp in self._consumer.assignment() if tp.partition == p]

    def _start(self, task: _Task) -> None:
        self.tasks[task.partition] = task
        task.loop = asyncio.create_task(self._run_task(task), name=f"legato.partition-{task.partition}")

    # --- one batch, one transaction -----------------------------------------------------------

    async def _process(self, task: _Task, parts: list[tuple[TopicPartition, list[Any], float]]) -> None:
        received = min(r for _, _, r in parts)
        try:
            batch = self._decide_batch(task, parts)
            if batch is not None:
                await self._commit(task, batch)
        except _Poisoned as exc:
            # The decision changed the run's state object in place before it raised, and earlier records of this
            # batch may share that object: drop the batch, reload the partition, read it all again and
            # dead-letter this one record without deciding it.
            self._poisoned[exc.position] = exc.reason
            await self._reload(task, "a record the state machine raised on")
            return
        except Exception as exc:
            # The broker is away, the transaction was refused or fenced (the broker aborted it, or another member
            # owns the partition now): nothing of this batch is visible. The table already holds the batch, so
            # rebuild the partition from the log and read the batch again.
            log.warning("partition %d: %s: %s", task.partition, type(exc).__name__, exc)
            await self._reload(task, f"{type(exc).__name__}")
            return
        if batch is None:
            return
        for tp, offset in batch.offsets.items():
            task.next_offset[tp] = offset
        task.running += batch.running
        if self._poisoned:
            self._poisoned = {k: v for k, v in self._poisoned.items() if k[2] >= task.next_offset.get(TopicPartition(k[0], k[1]), 0)}
        for timer in batch.timers:
            task.timers.schedule(timer.run_id, timer.timer_id, timer.due_ms)
        if self.metrics is not None and batch.overheads:
            overhead = time.perf_counter() - received  # completion polled → its requests committed
            for workflow in batch.overheads:
                self.metrics.orchestration_overhead(workflow, overhead)

    def _decide_batch(self, task: _Task, parts: list[tuple[TopicPartition, list[Any], float]]) -> _Batch | None:
        batch = _Batch()
        for tp, records, _ in parts:
            start = max(task.next_offset.get(tp, 0), batch.offsets.get(tp, 0))
            for msg in records:
                if msg.offset < start:
                    continue  # already committed (fetched before this task's offsets were known)
                self._handle(task, msg, batch)
                batch.offsets[tp] = msg.offset + 1
        if not batch.offsets:
            return None
        for run_id, state in batch.changed.items():
            stored = state.model_dump_json(exclude_defaults=True).encode()
            key = run_id.encode()
            task.store.put(key, stored)
            batch.written[key] = stored
            self._remember(run_id, stored, state)
        return batch

    async def _commit(self, task: _Task, batch: _Batch) -> None:
        producer = task.producer
        await producer.begin_transaction()
        try:
            futures = [await producer.send(topic, value, key=key, partition=partition) for topic, key, value, partition in batch.sends]
            futures += [await producer.send(self.changelog, value, key=key, partition=task.partition) for key, value in batch.written.items()]
            await producer.send_offsets_to_transaction(batch.offsets, self.group)
            for fut in futures:
                await fut  # aiokafka would commit a transaction in which a record failed: check every one first
            await producer.commit_transaction()
        except BaseException:
            try:
                await producer.abort_transaction()
            except Exception:
                pass  # fenced or fatal: the task is rebuilt with a fresh producer, which aborts it anyway
            raise

    def _handle(self, task: _Task, msg: Any, batch: _Batch) -> None:
        poisoned = self._poisoned.get((msg.topic, msg.partition, msg.offset))
        if poisoned is not None:
            self._dead_letter(batch, msg, poisoned)
            return
        if msg.topic == self.topics.triggers:
            self._route_trigger(msg, batch)
            return
        try:
            record = self._decode(msg.topic, msg.value)
        except DecodeError as exc:
            self._dead_letter(batch, msg, f"bad {'completion' if msg.topic == self.topics.completions else 'coordinator record'}: {exc}")
            return
        if msg.partition != self._partition_of(record.run_id):
            # A producer that did not key by run_id (or used another partitioner): move the record to the run's
            # partition instead of splitting the run's state.
            batch.sends.append((msg.topic, record.run_id.encode(), msg.value, None))
            self._count_ignored("rekeyed")
            return
        self._apply(task, record, msg, batch)

    def _route_trigger(self, msg: Any, batch: _Batch) -> None:
        """Validate a trigger and re-key it by run_id onto the coordinator topic (in the same transaction)."""
        try:
            trigger = codec.decode(RunRequested, msg.value)
        except DecodeError as exc:
            self._dead_letter(batch, msg, f"bad trigger: {exc}")
            return
        run_id = trigger.run_id or run_id_for(msg.topic, msg.partition, msg.offset)
        accepted = RunAccepted(run_id=run_id, workflow=trigger.workflow, input=trigger.input, correlation_id=trigger.correlation_id, parent=trigger.parent)
        batch.sends.append((self.topics.coordinator, run_id.encode(), codec.dumps(accepted), None))

    def _apply(self, task: _Task, record: Any, msg: Any, batch: _Batch) -> None:
        state = batch.changed.get(record.run_id)
        if state is None:
            state = self._load(record.run_id, task.store.get(record.run_id.encode()))
        position = f"{msg.topic}:{msg.partition}"
        if state is not None and state.cursor.get(position, -1) >= msg.offset:
            # The state already holds this event (offsets reset by hand, or read again after an unclean
            # hand-over): re-issue what the run is waiting on; ids are deterministic, so duplicates drop.
            wf = self.machine.workflows.get(state.workflow)
            completion_topic = wf.definition.completion_topic if wf else None
            commands = outstanding(state, completion_topic) if state.cursor[position] == msg.offset else []
            self._count_ignored("replayed")
            self._carry_out(commands, batch)
            return
        now = now_ms()
        was_running = state is not None and state.status == "running"
        # The decision changes the decoded object in place (a deep copy costs more than the decision), so it
        # leaves the cache until the batch has stored its bytes.
        self._states.pop(record.run_id, None)
        try:
            new_state, commands, events = self.machine.decide_events(state, record, now, in_place=True)
            self._carry_out(commands, batch)
        except Exception as exc:  # a bug in deciding this event must not stop every other run
            log.exception("coordinator failed to decide %s:%s@%s", msg.topic, msg.partition, msg.offset)
            raise _Poisoned((msg.topic, msg.partition, msg.offset), f"internal error: {type(exc).__name__}: {exc}") from exc
        unchanged = bool(commands) and all(isinstance(c, EventIgnored) for c in commands)
        if new_state is not None and not unchanged:
            new_state.cursor[position] = msg.offset
            batch.changed[record.run_id] = new_state
            batch.running += (new_state.status == "running") - was_running
        if self.metrics is not None:
            # Derived now, while the state object still is this decision's result (later records of the batch
            # change it in place). A batch whose transaction fails is read again and counted again: rare.
            kind = {ActivityCompleted: "completion", TimerFired: "timer", ChildRunFinished: "child", RunCancelRequested: "cancel"}.get(type(record), "trigger")
            self.metrics.event_processed(kind)
            self.metrics.decision(events, commands)
            if kind == "completion" and new_state is not None and self.metrics.observes_overhead(commands):
                batch.overheads.append(new_state.workflow)

    def _carry_out(self, commands: list[Any], batch: _Batch) -> None:
        sends = batch.sends
        for command in commands:
            if isinstance(command, RequestActivity):
                req = command.request
                sends.append((self.topics.requests(req.activity), req.run_id.encode(), codec.dumps(req), None))
            elif isinstance(command, StartTimer):
                batch.timers.append(command)
            elif isinstance(command, PublishRunEvent):
                value = codec.dumps(command.event)
                sends.append((self.topics.runs, command.event.run_id.encode(), value, None))
                if command.completion_topic:
                    sends.append((command.completion_topic, command.event.run_id.encode(), value, None))
            elif isinstance(command, CancelRequest):
                c = command.cancel
                sends.append((self.topics.cancellations, c.run_id.encode(), codec.dumps(c), None))
            elif isinstance(command, StartChildRun):
                a = command.accepted
                sends.append((self.topics.coordinator, a.run_id.encode(), codec.dumps(a), None))
            elif isinstance(command, CancelChildRun):
                c = command.cancel
                sends.append((self.topics.coordinator, c.run_id.encode(), codec.dumps(c), None))
            elif isinstance(command, NotifyParent):
                f = command.finished
                sends.append((self.topics.coordinator, f.run_id.encode(), codec.dumps(f), None))
            elif isinstance(command, EventIgnored):
                self._count_ignored(command.reason)
                log.info("ignored event for run %s: %s %s", command.run_id, command.reason, command.detail)
            else:
                raise TypeError(f"the coordinator cannot carry out {type(command).__name__}")

    def _dead_letter(self, batch: _Batch, msg: Any, reason: str) -> None:
        key, value = dead_letter(msg.topic, msg.partition, msg.offset, msg.key, msg.value, reason)
        batch.sends.append((self.topics.dlq, key, value, None))
        if self.metrics is not None:
            self.metrics.dead_letter(msg.topic, reason)

    # --- assignment ---------------------------------------------------------------------------

    async def _revoke(self, revoked: Iterable[TopicPartition]) -> None:
        """Park the revoked tasks once their batch in hand has committed; they are reused if assigned back. What
        they had queued is dropped: it is not committed, so whoever owns the partition next reads it again."""
        async with self._lock:
            partitions = {tp.partition for tp in revoked}
            for p in sorted(partitions & set(self.tasks)):
                task = self.tasks[p]
                async with task.busy:
                    if self.tasks.get(p) is not task:
                        continue  # its last batch failed and closed it: the partition was pending a reload
                    del self.tasks[p]
                    task.inbox, task.queued, task.paused = [], 0, False
                    task.wake.set()  # its loop sees it is no longer active and ends
                self._parked[p] = task
            self._pending -= partitions
            self._parked_as = self._membership()

    async def _assign(self, assigned: Iterable[TopicPartition]) -> None:
        """Keep the parked tasks assigned back, and leave the new partitions paused for the consume loop to open:
        this callback runs without heartbeats, so loading run tables here could cost the group membership."""
        assert self._consumer is not None
        async with self._lock:
            wanted = {tp.partition for tp in assigned}
            member, generation = self._membership()
            # reused only across one rebalance this member took part in: nobody else owned them in between
            if member is not None and member == self._parked_as[0] and generation == (self._parked_as[1] or 0) + 1:
                for p in sorted(wanted & set(self._parked)):
                    task = self._parked.pop(p)
                    for tp, offset in task.next_offset.items():
                        if tp in assigned:
                            self._consumer.seek(tp, offset)  # what it dropped from its queue is read again
                    self._start(task)
            await self._close_parked()
            self._pending = wanted - set(self.tasks)
            paused = [tp for tp in assigned if tp.partition in self._pending]
            if paused:
                self._consumer.pause(*paused)

    def _membership(self) -> tuple[Any, Any]:
        coordinator = getattr(self._consumer, "_coordinator", None)
        return getattr(coordinator, "member_id", None), getattr(coordinator, "generation", None)

    async def _close_parked(self) -> None:
        parked = list(self._parked)
        self.tasks.update(self._parked)
        self._parked.clear()
        await self._close_tasks(parked)

    async def _reload(self, task: _Task, why: str) -> None:
        """Drop a partition's task and open it again from the log (the consume loop does, with back-off)."""
        assert self._consumer is not None
        log.warning("partition %d: reloading it from the changelog (%s)", task.partition, why)
        await self._close_tasks([task.partition])
        tps = self._assigned(task.partition)
        if tps:
            self._pending.add(task.partition)
            self._consumer.pause(*tps)

    async def _open_pending(self) -> bool:
        """Open the pending partitions; False when one could not be opened (it stays pending)."""
        assert self._consumer is not None
        async with self._lock:
            for p in sorted(self._pending):
                try:
                    await self._open_task(p)
                except Exception as exc:
                    log.warning("partition %d: cannot open it (%s: %s); trying again", p, type(exc).__name__, exc)
                    return False
                self._pending.discard(p)
                self._consumer.resume(*self._assigned(p))
        return True

    async def _open_task(self, p: int) -> None:
        """Fence the previous owner, load the run table from the changelog, resume from the committed offsets."""
        assert self._consumer is not None
        started = time.perf_counter()
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap,
            transactional_id=f"{self.group}-{p}",
            transaction_timeout_ms=_TRANSACTION_TIMEOUT_MS,
            linger_ms=0,
            retry_backoff_ms=_TRANSACTION_RETRY_BACKOFF_MS,
            **security.aiokafka_kwargs(),
        )
        try:
            task = _Task(p, producer, _Store(self._store_path(p)))
        except BaseException:
            await producer.stop()
            raise
        try:
            await producer.start()  # InitProducerId: aborts the dead owner's open transaction, fences it for good
            loaded = await self._restore(task) if p < self.partitions else 0
            for topic in (self.topics.triggers, self.topics.coordinator, self.topics.completions):
                tp = TopicPartition(topic, p)
                if tp not in self._consumer.assignment():
                    continue
                committed = await self._consumer.committed(tp)  # asked after the fence: no pending offsets left
                if committed is None:
                    await self._consumer.seek_to_beginning(tp)
                else:
                    self._consumer.seek(tp, committed)
                    task.next_offset[tp] = committed
        except BaseException:
            await producer.stop()
            task.store.close()
            raise
        self._start(task)
        log.info("partition %d: %d runs loaded in %.2fs", p, loaded, time.perf_counter() - started)

    async def _close_tasks(self, partitions: list[int]) -> None:
        for p in partitions:
            task = self.tasks.pop(p, None)
            if task is None:
                continue
            task.wake.set()  # its loop sees it is no longer active and ends (it may be the caller)
            try:
                await task.producer.stop()
            except Exception as exc:
                log.warning("partition %d: closing its producer failed: %s", p, exc)
            task.store.close()
        if partitions:
            self._states.clear()

    async def _restore(self, task: _Task) -> int:
        """Read changelog partition ``p`` to its last stable offset; re-arm the timers of the runs in it."""
        reader = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                  isolation_level="read_committed", max_partition_fetch_bytes=8 * 1024 * 1024, **security.aiokafka_kwargs())
        tp = TopicPartition(self.changelog, task.partition)
        loaded = 0
        try:
            await reader.start()
            reader.assign([tp])
            end = (await reader.end_offsets([tp]))[tp]
            await reader.seek_to_beginning(tp)
            while await reader.position(tp) < end:
                for records in (await reader.getmany(tp, timeout_ms=1000, max_records=10_000)).values():
                    for rec in records:
                        if rec.value is not None:
                            task.store.put(rec.key, rec.value)
        finally:
            await reader.stop()
        for raw in task.store.values():
            loaded += 1
            if keys.has_timers(raw):
                state = RunState.model_validate_json(raw)
                for timer_id, timer in state.timers.items():
                    task.timers.schedule(state.run_id, timer_id, timer.due_ms)
        task.running = count_in_flight(task.store.values())
        return loaded

    def _store_path(self, p: int) -> Path | None:
        if self.settings.store != "rocksdb":
            return None
        return self.settings.data_dir / self.group / f"runs-{p}"

    # --- timers -------------------------------------------------------------------------------

    async def _fire_timers(self) -> None:
        """Due timers become TimerFired records on the coordinator topic: the decision is made by the loop."""
        assert self._timer_producer is not None
        while True:
            await asyncio.sleep(0.02)
            for task in list(self.tasks.values()):
                try:
                    await self._fire_due(task)
                except Exception:  # one partition's trouble (closed under us) must not stop every timer
                    log.exception("partition %d: firing timers failed", task.partition)

    async def _fire_due(self, task: _Task) -> None:
        assert self._timer_producer is not None
        for run_id, timer_id in task.timers.due(now_ms()):
            if self.tasks.get(task.partition) is not task:
                return  # closed or reloaded while a send was awaited; a reload re-arms its timers
            key = run_id.encode()
            raw = task.store.get(key)
            if raw is None or not keys.timer_pending(raw, timer_id):
                continue  # finished or cleared since it was set
            try:
                await self._timer_producer.send(self.topics.coordinator, codec.dumps(TimerFired(run_id=run_id, timer_id=timer_id)), key=key)
            except Exception as exc:  # the broker is away: the timer is in the table, try again shortly
                log.warning("cannot fire timer %s of run %s (%s); retrying", timer_id, run_id, exc)
                task.timers.schedule(run_id, timer_id, now_ms() + 1000)

    async def _report_in_flight(self) -> None:
        while True:
            self.metrics.runs_in_flight(sum(t.running for t in list(self.tasks.values())))
            await asyncio.sleep(5.0)

    # --- helpers ------------------------------------------------------------------------------

    def _load(self, run_id: str, raw: bytes | None) -> RunState | None:
        """The run's state, reusing the object decoded last time while the table still holds those bytes."""
        if raw is None:
            return None
        cached = self._states.get(run_id)
        if cached is not None and cached[0] == raw:
            self._states.move_to_end(run_id)
            return cached[1]
        state = RunState.model_validate_json(raw)
        self._remember(run_id, raw, state)
        return state

    def _remember(self, run_id: str, raw: bytes, state: RunState) -> None:
        self._states[run_id] = (raw, state)
        self._states.move_to_end(run_id)
        if len(self._states) > _DECODED_STATES:
            self._states.popitem(last=False)

    def _decode(self, topic: str, value: bytes | None) -> Any:
        if topic == self.topics.completions:
            return codec.decode(ActivityCompleted, value)
        raw = codec.decode_object(value)
        kind = raw.get("type")
        if kind == "run.accepted":
            return codec.validate(RunAccepted, raw)
        if kind == "timer.fired":
            return codec.validate(TimerFired, raw)
        if kind == "child.finished":
            return codec.validate(ChildRunFinished, raw)
        if kind == "run.cancel_requested":
            return codec.validate(RunCancelRequested, raw)
        raise DecodeError(f"unknown record type {kind!r}")

    def _partition_of(self, run_id: str) -> int:
        key = run_id.encode()
        return self._partitioner(key, list(range(self.partitions)), list(range(self.partitions)))

    def _count_ignored(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.ignored(reason)
