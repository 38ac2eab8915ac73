"""One input partition's decisions: each batch decided, stored, sent and committed in ONE transaction.

A batch's transaction holds the records the decisions caused, the new state of every run they touched (the
changelog), any dead letters and the input offsets: all of it becomes visible, or none of it. The partition's task
and run table (``task``, ``table``), the batch itself (``batch``), the decoded states (``states``) and benchmark
tracing (``trace``) are modules of their own.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from aiokafka import AIOKafkaProducer, TopicPartition

from legato.streams.coordinator.batch import Batch, encode_offsets
from legato.streams.coordinator.cache import ResultTable
from legato.streams.coordinator.effects import carry_out
from legato.streams.coordinator.inbox import Inbox
from legato.streams.coordinator.marks import forwarded_triggers, wall_ms
from legato.streams.kafka_io import transaction
from legato.streams.coordinator.payloads import PayloadValues
from legato.streams.coordinator.states import DecodedStates
from legato.streams.coordinator.task import PartitionTask, restore
from legato.streams.coordinator.timers import now_ms
from legato.streams.coordinator.trace import Trace
from legato.topics.codec import DecodeError
from legato.topics.models import ActivityCompleted, ActivityHeartbeat, ActivityStarted, ChildRunFinished, RunCancelRequested, RunForkAccepted, RunForkRequested, RunRedriveRequested, SignalSent, TimerFired
from legato.topics.names import CHANGELOG_OFFSETS_KEY, Topics
from legato.workflows import keys
from legato.workflows.claims import PayloadsMissing
from legato.workflows.lifecycle import retention_ms
from legato.workflows.machine import EventIgnored, ForgetPayloads, ForgetRun, Machine, outstanding
from legato.workflows.state import RunState

log = logging.getLogger("legato.coordinator")


GROUP_OFFSETS_EVERY_S = 1.0
"""Where the input topics resume is stored with the run states, in the changelog record ``CHANGELOG_OFFSETS_KEY`` of
every batch's transaction; the consumer group's offsets (what lag monitoring reads) are added to a transaction at
most this often: ``send_offsets_to_transaction`` costs two sequential round trips to the broker (AddOffsetsToTxn,
TxnOffsetCommit), a third of a step's overhead at low load (BENCHMARKS.md, latency)."""

_CHAIN = 16
"""Batches one call of ``Partitions.process`` commits back to back (each decided while the one before commits) before
it lets a rebalance, waiting for the partition, in."""

_MAX_BATCH = 500
"""Records decided into the next batch while one commits: it bounds a transaction's size, and with it the memory that
the partitions' batches in flight hold at once (like the consume loop's queue, ``loop._MAX_QUEUED``)."""

CLOCK_SKEW_MS = 250
"""How far apart two coordinators' clocks may be: a timer due this much later than this process's clock may already
have been fired by the partition's previous owner, so a completion of its run sends no request early (``_apply``)."""


def _retention_timer(value: bytes | None) -> bool:
    """Whether a record is a run's retention timer: it forgets the run and reads no value (its payloads are not
    fetched to be deleted)."""
    return bool(value) and b'"timer.fired"' in value and f'"{keys.RUN_RETENTION}'.encode() in value


class TimerBounds:
    """Whether any of a run's timers is due by a time, without reading all of them at each event: a ``map`` over
    10,000 items holds 10,000 step timers, and a scan per completion made the fan-out quadratic (a third of the
    coordinator's CPU per branch at N = 10,000).

    For a run with ``MANY`` timers or more it keeps a lower bound of their earliest ``due_ms``: the earliest found by
    the last full read, lowered by every timer the run's decisions start since (``started``; the machine sets timers
    only with a ``StartTimer`` command). A cleared timer leaves the bound lower than it need be, which costs a read,
    never a wrong answer. While the bound is later than asked, no timer can be due; otherwise the timers are read
    and the bound made exact again. The bounds are dropped with the decoded states whenever a partition is closed,
    which includes its reload after a failed transaction (``Rebalance.reload``): a bound taken from a state that a
    decision changed in place, in a batch never committed, is not kept for the state read again from the log."""

    MANY = 16

    def __init__(self) -> None:
        self._bound: dict[str, int] = {}

    def due(self, state: RunState, by_ms: int) -> bool:
        timers = state.timers
        if len(timers) < self.MANY:
            return any(timer.due_ms <= by_ms for timer in timers.values())
        bound = self._bound.get(state.run_id)
        if bound is not None and bound > by_ms:
            return False
        earliest = min(timer.due_ms for timer in timers.values())
        self._bound[state.run_id] = earliest
        return earliest <= by_ms

    def started(self, run_id: str, due_ms: int) -> None:
        bound = self._bound.get(run_id)
        if bound is not None and due_ms < bound:
            self._bound[run_id] = due_ms

    def forget(self, run_id: str) -> None:
        self._bound.pop(run_id, None)

    def clear(self) -> None:
        self._bound.clear()


_STATE_REFS_MIN = 64 * 1024
"""A stored state this large has its references kept (``Partitions._state_refs``) rather than looked for at each of
its run's records."""

STATE_COMMIT_S = 0.05
"""How long a batch whose transaction carries nothing but run states and input offsets (every request it decided
went ahead of it, ``Partitions.early``) waits, counted from when its partition's previous transaction began, for
more records to decide into it before it commits (``LEGATO_STATE_COMMIT_MS``). Nothing waits for such a
transaction: the worker already has the request, and the completion it answers with is read after it either way.
Committing each one at once cost the broker and the coordinator about 2 ms of CPU per transaction, and at a few
hundred steps/s every step was its own transaction: at 340 steps/s the pair burnt 140 % of the machine's two cores
(BENCHMARKS.md, overhead under load). A batch with anything else in it (a terminal event, a request that has to be
in the transaction, a dead letter) commits at once."""

_EVENT_KINDS = {ActivityCompleted: "completion", ActivityStarted: "started", ActivityHeartbeat: "heartbeat", TimerFired: "timer", ChildRunFinished: "child", RunCancelRequested: "cancel", SignalSent: "signal",
                RunRedriveRequested: "redrive", RunForkRequested: "fork", RunForkAccepted: "fork"}


class Poisoned(Exception):
    """The state machine raised on a record: a bug. The batch is dropped and read again, without that record."""

    def __init__(self, position: tuple[str, int, int], reason: str):
        super().__init__(reason)
        self.position = position
        self.reason = reason


class Partitions:
    """Loads, decides and commits the partitions' batches; shared by every task of one coordinator process."""

    def __init__(self, machine: Machine, topics: Topics, group: str, inbox: Inbox, metrics: Any = None, trace: Trace | None = None,
                 cache: ResultTable | None = None, early: AIOKafkaProducer | None = None, state_commit_s: float = STATE_COMMIT_S,
                 payloads: PayloadValues | None = None):
        self.machine = machine
        self.payloads = payloads  # fetched before each decision: the machine's expressions read them (claim checks)
        self.state_commit_s = state_commit_s  # STATE_COMMIT_S
        self.early = early  # sends the requests of a batch ahead of its transaction; None: every request in it
        self.position: Callable[[TopicPartition], int | None] | None = None  # the consumer's position in an input partition
        self.cache = cache  # answers requests of cache steps (coordinator.cache)
        self.trace = trace
        self.topics = topics
        self.group = group
        self.inbox = inbox
        self.metrics = metrics
        self.states = DecodedStates()
        self.timer_bounds = TimerBounds()
        self._large_state_refs: dict[bytes, list] = {}  # a large stored state's references (``_state_refs``)
        self.keyed: Callable[[], set[str]] = set  # the workflows with a concurrency key now (coordinator.marks)
        self._poisoned: dict[tuple[str, int, int], str] = {}  # (topic, partition, offset) → why it is dead-lettered

    # --- loading -------------------------------------------------------------------------------

    async def restore(self, task: PartitionTask, bootstrap: str) -> int:
        """Read changelog partition ``p`` to its last stable offset; re-arm the timers of the runs in it."""
        return await restore(task, bootstrap, self.topics.changelog, self._retention_due)

    def _retention_due(self, state: RunState) -> int:
        """When a run that finished before runs had a retention timer is forgotten."""
        definition = self.machine.pinned(state)
        return (state.finished_ms or state.started_ms) + retention_ms(definition.workflow if definition else None, self.machine.default_retention_s)

    def forget(self) -> None:
        """Drop the decoded states (a partition was closed: its table is gone)."""
        self.states.clear()
        self.timer_bounds.clear()
        self._large_state_refs.clear()

    # --- one batch, one transaction ------------------------------------------------------------

    async def process(self, task: PartitionTask, parts: list[tuple[TopicPartition, list[Any], float]],
                      more: Callable[[], list[tuple[TopicPartition, list[Any], float]]] | None = None) -> str | None:
        """Decide and commit ``parts``; the reason to reload the partition from the log when that failed, else None.

        While a batch's transaction commits, the records that arrive meanwhile (``more`` takes them from the task's
        queue) are decided into the next batch and its early requests go out at once; that batch commits as soon as
        the one before has, up to ``_CHAIN`` batches per call. A batch of nothing but run states first waits for more
        (``_linger``). A failure at any point reloads the partition: every
        batch not yet committed is read again."""
        try:
            await self._prefetch(task, parts)
            batch = self._decide_batch(task, parts, seal=False)
        except Poisoned as exc:
            self._poisoned[exc.position] = exc.reason
            return "a record the state machine raised on"
        except PayloadsMissing as exc:  # evicted by a larger batch since it was fetched: read the partition again
            log.warning("partition %d: %s", task.partition, exc)
            return "PayloadsMissing"
        except Exception as exc:  # the payload store failed (the broker away): nothing decided yet, read them again
            log.warning("partition %d: fetching payloads: %s: %s", task.partition, type(exc).__name__, exc, exc_info=True)
            return type(exc).__name__
        chain = 0
        while batch is not None:
            chain += 1
            try:
                await self._send_early(task, batch)
                await self._linger(task, batch, more)
                self._seal(task, batch)
                commit = asyncio.ensure_future(self._commit(task, batch))
            except Poisoned as exc:
                # decided into a batch not yet committed, whose run states it may have changed in place: that batch
                # is dropped with it (its early requests are decided again, and workers drop them)
                self._poisoned[exc.position] = exc.reason
                return "a record the state machine raised on"
            except Exception as exc:
                log.warning("partition %d: %s: %s", task.partition, type(exc).__name__, exc)
                return type(exc).__name__
            following: Batch | None = None
            poisoned: Poisoned | None = None
            broken: str | None = None
            while not commit.done():
                room = following is None or following.size < _MAX_BATCH
                if more is not None and poisoned is None and broken is None and chain < _CHAIN and room and task.inbox:
                    task.wake.clear()
                    try:
                        arrived = more()
                        await self._prefetch(task, arrived)
                        following = self._decide_batch(task, arrived, following or Batch(unsettled=set(batch.mixed)), seal=False)
                        if following is not None:
                            await self._send_early(task, following)
                    except Poisoned as exc:
                        poisoned = exc
                    except Exception as exc:
                        broken = type(exc).__name__
                    continue
                waiter = asyncio.ensure_future(task.wake.wait())
                try:
                    await asyncio.wait([commit, waiter], return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    commit.cancel()  # the process is stopping: the open transaction is aborted, the next owner reads it again
                    raise
                finally:
                    waiter.cancel()
            try:
                commit.result()
            except Exception as exc:
                # The broker is away, the transaction was refused or fenced (the broker aborted it, or another
                # member owns the partition now): nothing of this batch is visible. The table already holds the
                # batch (and any decided after it), so rebuild the partition from the log and read them again.
                log.warning("partition %d: %s: %s", task.partition, type(exc).__name__, exc)
                return type(exc).__name__
            self._committed(task, batch)
            if broken is not None:
                log.warning("partition %d: the next batch failed: %s", task.partition, broken)
                return broken
            if poisoned is not None:
                # The decision changed the run's state object in place before it raised, and earlier records of
                # its batch may share that object: drop that batch, reload the partition, read it all again and
                # dead-letter this one record without deciding it.
                self._poisoned[poisoned.position] = poisoned.reason
                return "a record the state machine raised on"
            batch = following
        return None

    async def _linger(self, task: PartitionTask, batch: "Batch", more: Callable[[], list[tuple[TopicPartition, list[Any], float]]] | None) -> None:
        """Keep deciding arriving records into ``batch`` while its transaction would carry nothing but run states
        (``STATE_COMMIT_S`` after the partition's previous transaction began, ``_MAX_BATCH`` records at most)."""
        if more is None or self.state_commit_s <= 0:
            return
        deadline = task.commit_began + self.state_commit_s
        while not batch.sends and batch.size < _MAX_BATCH:
            if task.inbox:
                task.wake.clear()
                arrived = more()
                await self._prefetch(task, arrived)
                self._decide_batch(task, arrived, batch, seal=False)
                await self._send_early(task, batch)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return
            task.wake.clear()
            try:
                await asyncio.wait_for(task.wake.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _send_early(self, task: PartitionTask, batch: "Batch") -> None:
        """Hand the batch's early requests not yet sent to the early producer (their deliveries: ``early_futures``,
        checked before the batch's transaction commits)."""
        sent = batch.early[len(batch.early_futures):]
        if self.trace is not None and "decided" not in batch.stamps:
            batch.stamps["decided"] = time.time()
        for _, key, _, _ in sent:
            run_id = key.decode()
            if run_id not in batch.early_runs:
                batch.early_runs.add(run_id)
                task.early_runs[run_id] += 1
        batch.early_futures += [await self.early.send(topic, value, key=key, partition=partition) for topic, key, value, partition in sent]
        if self.trace is not None and sent:
            self.trace.sent_early(batch, sent)
        if self.metrics is not None and sent and batch.overheads:
            # the completion's next request is on its way now, whenever the transaction commits
            # (each from when its own completion was polled: a batch that waits for more holds records polled later)
            early = {key.decode() for _, key, _, _ in sent}
            now = time.perf_counter()
            for workflow, run_id, received in batch.overheads:
                if run_id in early:
                    self.metrics.orchestration_overhead(workflow, now - received)
            batch.overheads = [o for o in batch.overheads if o[1] not in early]

    def _committed(self, task: PartitionTask, batch: "Batch") -> None:
        """What a batch's commit makes true: where the inputs resume, the runs counted, the timers armed."""
        if self.trace is not None:
            self.trace.committed(task.partition, batch, self.topics.requests(""))
        for tp, offset in batch.offsets.items():
            task.next_offset[tp] = offset
        p, keyed = task.partition, self.keyed()
        forwarded = forwarded_triggers(batch.sends, self.topics.coordinator, keyed.__contains__) if keyed else []
        task.marks.committed(task.next_offset.get(TopicPartition(self.topics.triggers, p)), task.next_offset.get(TopicPartition(self.topics.coordinator, p)),
                             forwarded, wall_ms())
        for run_id in batch.early_runs:
            task.early_runs[run_id] -= 1
            if task.early_runs[run_id] <= 0:
                del task.early_runs[run_id]
        if batch.group_offsets:
            task.group_offsets_at, task.group_offsets_behind = time.monotonic(), False
        else:
            task.group_offsets_behind = True
        task.running += batch.running
        task.stored += batch.stored
        if self._poisoned:
            self._poisoned = {k: v for k, v in self._poisoned.items() if k[2] >= task.next_offset.get(TopicPartition(k[0], k[1]), 0)}
        for timer in batch.timers:
            task.timers.schedule(timer.run_id, timer.timer_id, timer.due_ms)
        if self.metrics is not None and batch.overheads:
            now = time.perf_counter()  # completion polled → its requests committed
            for workflow, _, received in batch.overheads:
                self.metrics.orchestration_overhead(workflow, now - received)

    async def _prefetch(self, task: PartitionTask, parts: list[tuple[TopicPartition, list[Any], float]]) -> None:
        """Fetch the payloads that ``parts`` and the stored states of their runs refer to, for the machine to read."""
        if self.payloads is None:
            return
        refs = []
        states: set[bytes] = set()  # each run's stored state read once per poll, however many of its records came
        for _, records, _ in parts:
            for msg in records:
                refs += self.payloads.refs_of(msg.value)
                if msg.key is not None and msg.key not in states and not _retention_timer(msg.value):
                    states.add(msg.key)
                    refs += self._state_refs(msg.key, task.store.get(msg.key))
        if refs:
            await self.payloads.prefetch(refs)

    def _decide_batch(self, task: PartitionTask, parts: list[tuple[TopicPartition, list[Any], float]], batch: "Batch | None" = None,
                      seal: bool = True) -> "Batch | None":
        """Decide ``parts`` into ``batch`` (a new one by default), stored unless ``seal`` is False (``_seal``); None when
        nothing in them was new."""
        batch = batch if batch is not None else Batch()
        if self.trace is not None and "deciding" not in batch.stamps:
            batch.stamps["deciding"] = time.time()
        if parts:
            batch.received = min(batch.received, min(r for _, _, r in parts))
            # completions before the other topics' records polled with them (records of different topics have no order
            # of their own): a timer is decided only after the completions before its mark (``_answers_read``)
            parts = sorted(parts, key=lambda part: part[0].topic != self.topics.completions)
        tracing = self.trace is not None
        for tp, records, received in parts:
            start = max(task.next_offset.get(tp, 0), batch.offsets.get(tp, 0))
            polled = time.time() - (time.perf_counter() - received) if tracing else 0.0
            for msg in records:
                if msg.offset < start:
                    continue  # already committed (fetched before this task's offsets were known)
                if tracing:
                    before, deciding = len(batch.requested), time.time()
                self._handle(task, msg, batch, received)
                if tracing and len(batch.requested) > before:
                    self.trace.requests_decided(batch, batch.requested[before:], polled, deciding)
                batch.offsets[tp] = msg.offset + 1
                batch.size += 1
        if not batch.offsets:
            return None
        requested, batch.requested = batch.requested, []
        for send in requested:
            # A request caused only by workers' completions may go out before the transaction that stores its
            # run's new state: if that transaction is lost, the completions are read again in their log order,
            # the same request (same request_id and run_started_ms) is decided again and workers drop it, and
            # the worker's answer, later in the same completions partition, is read after it. An input of
            # another topic gives no such order, so its run's requests stay in the transaction (docs/concepts/guarantees.md).
            # Nor may a timer of the run be decided between the early request and its transaction's commit: the
            # fire loop holds back the timers of runs in ``PartitionTask.early_runs``, and a run that had a timer due
            # when a completion changed it (fired, maybe by the partition's previous owner, and not yet read) is
            # ``mixed`` (``_apply``): a replay could decide that timer first.
            run_id = send[1].decode()
            early = self.early is not None and run_id not in batch.mixed and run_id not in batch.unsettled
            (batch.early if early else batch.sends).append(send)
        batch.group_offsets = time.monotonic() - task.group_offsets_at >= GROUP_OFFSETS_EVERY_S
        if seal:
            self._seal(task, batch)
        return batch

    def _answers_read(self, task: PartitionTask, mark: int) -> bool:
        """Whether every completion of the task's partition before offset ``mark`` has been decided (this batch's
        completions are decided before its other records; the consumer's position counts transaction markers too)."""
        if self.position is None:
            return True
        tp = TopicPartition(self.topics.completions, task.partition)
        position = self.position(tp)
        if position is None or position < mark:
            return False
        return not any(t == tp and records and records[0].offset < mark for t, records, _ in task.inbox)

    def _state_refs(self, key: bytes, stored: bytes | None) -> list:
        """The references in a run's stored state. A large state's are kept from when it was stored (``_seal``) or
        last read: a ``map`` over 10,000 items has a state of megabytes, and reading it for references at each of its
        completions made the fan-out quadratic (the largest cost in the coordinator's CPU per branch)."""
        if stored is None or len(stored) < _STATE_REFS_MIN:
            return PayloadValues.refs_of(stored)
        refs = self._large_state_refs.get(key)
        if refs is None:
            refs = self._large_state_refs[key] = PayloadValues.refs_of(stored)
        return refs

    def _seal(self, task: PartitionTask, batch: "Batch") -> None:
        """Encode and store the state of every run the batch changed, once, when nothing more is decided into it (a
        batch that grows while the one before commits would otherwise encode a large run's state at every take)."""
        for run_id, state in batch.changed.items():
            key = run_id.encode()
            if state is None:
                task.store.delete(key)
                batch.written[key] = None
                self.states.drop(run_id)
                self._large_state_refs.pop(key, None)
                continue
            stored = state.encoded()
            task.store.put(key, stored)
            if self.payloads is not None and len(stored) >= _STATE_REFS_MIN:
                self._large_state_refs[key] = PayloadValues.refs_of(stored)  # read once per batch, not per record
            else:
                self._large_state_refs.pop(key, None)
            batch.written[key] = stored
            self.states.remember(run_id, stored, state)
        # nothing more is decided into a sealed batch: its states live on as bytes (and the last ones decoded, in
        # ``states``), not as objects for as long as its transaction takes (in a burst, eight partitions' batches
        # held 32,000 decoded states at once; BENCHMARKS.md, memory)
        batch.changed = {}

    async def flush_group_offsets(self, task: PartitionTask) -> None:
        """Commit the consumer group's offsets of an idle partition (they lag behind the changelog's by design)."""
        async with transaction(task.producer):
            await task.producer.send_offsets_to_transaction(dict(task.next_offset), self.group)
        task.group_offsets_at, task.group_offsets_behind = time.monotonic(), False

    async def _commit(self, task: PartitionTask, batch: Batch) -> None:
        producer = task.producer
        # where the inputs resume, as of this batch: the batch before it has committed by now
        batch.written[CHANGELOG_OFFSETS_KEY] = encode_offsets({**task.next_offset, **batch.offsets})
        stamps = batch.stamps if self.trace is not None else None
        if batch.forks and self.payloads is not None:
            await self.payloads.own_fork_seeds(batch.sends, self.topics.coordinator)  # a fork owns its payloads
        task.commit_began = time.monotonic()
        async with transaction(producer):  # on any failure the task is rebuilt with a fresh producer
            futures = [await producer.send(topic, value, key=key, partition=partition) for topic, key, value, partition in batch.sends]
            futures += [await producer.send(self.topics.changelog, value, key=key, partition=task.partition) for key, value in batch.written.items()]
            if stamps is not None:
                stamps["sent"] = time.time()
            if batch.group_offsets:
                await producer.send_offsets_to_transaction({**task.next_offset, **batch.offsets}, self.group)
            if stamps is not None:
                stamps["offsets"] = time.time()
            for fut in batch.early_futures + futures:
                await fut  # aiokafka would commit a transaction in which a record failed: check every one first
            if stamps is not None:
                stamps["acked"] = time.time()

    def _handle(self, task: PartitionTask, msg: Any, batch: Batch, received: float = 0.0) -> None:
        poisoned = self._poisoned.get((msg.topic, msg.partition, msg.offset))
        if poisoned is not None:
            self._dead_letter(batch, msg, poisoned)
            return
        if msg.topic == self.topics.triggers:
            try:
                accepted = self.inbox.accept_trigger(msg)
            except DecodeError as exc:
                self._dead_letter(batch, msg, f"bad trigger: {exc}")
                return
            if isinstance(accepted, tuple):
                batch.sends.append(accepted)  # re-keyed onto the run's partition of the coordinator topic
            else:
                self._apply(task, accepted, msg, batch, received)
            return
        try:
            record = self.inbox.decode(msg.topic, msg.value)
        except DecodeError as exc:
            self._dead_letter(batch, msg, f"bad {self.inbox.what(msg.topic)}: {exc}")
            return
        moved = self.inbox.misplaced(msg, record.run_id)
        if moved is not None:
            batch.sends.append(moved)
            self._count_ignored("rekeyed")
            return
        if isinstance(record, TimerFired) and record.completions_offset is not None and not self._answers_read(task, record.completions_offset):
            # completions written before the timer fired are not all decided yet (a new owner catching up): decide the
            # timer after them. It stays in the run's state, so dropping this record loses nothing if the process dies.
            task.timers.schedule(record.run_id, record.timer_id, now_ms() + 20)
            self._count_ignored("timer_deferred")
            return
        self._apply(task, record, msg, batch, received)

    def _apply(self, task: PartitionTask, record: Any, msg: Any, batch: Batch, received: float = 0.0) -> None:
        if record.run_id in batch.changed:  # None: forgotten earlier in this batch
            state = batch.changed[record.run_id]
        else:
            state = self.states.load(record.run_id, task.store.get(record.run_id.encode()))
        position = f"{msg.topic}:{msg.partition}"
        if state is not None and state.cursor.get(position, -1) >= msg.offset:
            # The state already holds this event (offsets reset by hand, or read again after an unclean
            # hand-over): re-issue what the run is waiting on; ids are deterministic, so duplicates drop.
            definition = self.machine.pinned(state)
            completion_topic = definition.workflow.definition.completion_topic if definition else None
            commands = outstanding(state, completion_topic) if state.cursor[position] == msg.offset else []
            self._count_ignored("replayed")
            batch.mixed.add(record.run_id)
            carry_out(commands, self.topics, batch.sends, batch.timers, self._count_ignored, lambda reason: None, self.cache, batch.requested)
            return
        now = now_ms()
        if msg.topic != self.topics.completions or (state is not None and self.timer_bounds.due(state, now + CLOCK_SKEW_MS)):
            batch.mixed.add(record.run_id)
        was_running = state is not None and state.status == "running"
        # The decision changes the decoded object in place (a deep copy costs more than the decision), so it
        # leaves the cache until the batch has stored its bytes.
        self.states.drop(record.run_id)
        try:
            new_state, commands, events = self.machine.decide_events(state, record, now, in_place=True)
            timers_before = len(batch.timers)
            carry_out(commands, self.topics, batch.sends, batch.timers, self._count_ignored, lambda reason: self._dead_letter(batch, msg, reason), self.cache,
                      batch.requested)
        except PayloadsMissing:
            raise  # not this record's fault: the partition is read again, its payloads fetched first
        except Exception as exc:  # a bug in deciding this event must not stop every other run
            log.exception("coordinator failed to decide %s:%s@%s", msg.topic, msg.partition, msg.offset)
            raise Poisoned((msg.topic, msg.partition, msg.offset), f"internal error: {type(exc).__name__}: {exc}") from exc
        for timer in batch.timers[timers_before:]:
            self.timer_bounds.started(timer.run_id, timer.due_ms)
        batch.forks = batch.forks or isinstance(record, RunForkRequested)
        unchanged = bool(commands) and all(isinstance(c, EventIgnored) for c in commands)
        if new_state is not None and not unchanged:
            new_state.cursor[position] = msg.offset
            batch.changed[record.run_id] = new_state
            batch.running += (new_state.status == "running") - was_running
            batch.stored += state is None
        elif state is not None and any(isinstance(c, ForgetRun) for c in commands):
            batch.changed[record.run_id] = None
            batch.stored -= 1
            self.timer_bounds.forget(record.run_id)
            if self.payloads is not None:
                batch.sends += self.payloads.forget(state.run_id, state.encoded(), state.unused_payloads)  # its payloads go with it
            if self.metrics is not None:
                self.metrics.run_forgotten(state.workflow)
        elif state is None and self.payloads is not None:
            for command in commands:
                if isinstance(command, ForgetPayloads):  # a late completion's payloads, its run long forgotten
                    batch.sends += self.payloads.forget(command.run_id, b"{}", command.payloads)
        if self.metrics is not None:
            # Derived now, while the state object still is this decision's result (later records of the batch
            # change it in place). A batch whose transaction fails is read again and counted again: rare.
            kind = _EVENT_KINDS.get(type(record), "trigger")
            self.metrics.event_processed(kind)
            self.metrics.decision(events, commands)
            if kind == "completion" and new_state is not None and self.metrics.observes_overhead(commands):
                batch.overheads.append((new_state.workflow, record.run_id, received))

    def _dead_letter(self, batch: Batch, msg: Any, reason: str) -> None:
        batch.sends.append(self.inbox.dead_letter(msg, reason))
        if self.metrics is not None:
            self.metrics.dead_letter(msg.topic, reason)

    def _count_ignored(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.ignored(reason)
