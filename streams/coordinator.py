"""The coordinator: a faust agent over the run-keyed input, a run table keyed by run_id, and timers.

decode → load the run → decide → store the run → send the commands → count. Every decision is made by
``workflows.machine``; this module only moves bytes.
"""
from __future__ import annotations

import asyncio
import heapq
from collections import OrderedDict
import logging
import time
import uuid
from typing import Any

import faust
from aiokafka.partitioner import DefaultPartitioner

from streams.dlq import DeadLetters
from streams.metrics import count_in_flight
from topics import codec
from topics.codec import DecodeError
from topics.models import ActivityCompleted, ChildRunFinished, RunAccepted, RunRequested, TimerFired
from topics.names import Topics
from workflows.machine import (
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
from workflows.model import CompiledWorkflow
from workflows.state import RunState

log = logging.getLogger("legato.coordinator")

_DECODED_STATES = 1_000
"""Decoded run states kept between events (keyed by the exact bytes in the table, so never stale)."""

_RUN_ID_NAMESPACE = uuid.UUID("6f1c5a3e-8d0b-4c1e-9b7a-1e2d3c4b5a69")


_IO_ATTEMPTS = 12
"""Tries to store and send one event's results (backing off up to 10 s) before it is dead-lettered."""


class _DecisionFailed(Exception):
    """The state machine raised: a bug, not the broker."""


def now_ms() -> int:
    return int(time.time() * 1000)


def run_id_for(topic: str, partition: int, offset: int) -> str:
    """A trigger without a run_id gets one derived from its position, so a redelivered trigger gets the same."""
    return str(uuid.uuid5(_RUN_ID_NAMESPACE, f"{topic}:{partition}:{offset}"))


class Timers:
    """Pending timers in memory; the run table is the truth, rescanned after every rebalance."""

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


class Coordinator:
    """Wires the state machine into a faust app."""

    def __init__(self, app: faust.App, topics: Topics, workflows: dict[str, CompiledWorkflow], partitions: int, dlq: DeadLetters, metrics: Any = None):
        self.app = app
        self.topics = topics
        self.machine = Machine(workflows)
        self.partitions = partitions
        self.dlq = dlq
        self.metrics = metrics
        self.timers = Timers()
        self._states: OrderedDict[str, tuple[bytes, RunState]] = OrderedDict()
        self._partitioner = DefaultPartitioner()
        self._out_topics: dict[str, faust.TopicT] = {}
        raw = {"key_serializer": "raw", "value_serializer": "raw"}
        self.triggers = app.topic(topics.triggers, partitions=partitions, **raw)
        self.input = app.topic(topics.coordinator, topics.completions, partitions=partitions, **raw)
        self.coordinator_topic = app.topic(topics.coordinator, partitions=partitions, **raw)
        self.table = app.Table("runs", default=None, partitions=partitions, key_type=bytes, value_type=bytes)
        app.agent(self.triggers, name="legato.route_triggers")(self._route_triggers)
        app.agent(self.input, name="legato.coordinate")(self._coordinate)
        app.timer(interval=0.02, name="legato.fire_timers")(self._fire_timers)
        if metrics is not None:
            app.timer(interval=5.0, name="legato.runs_in_flight")(self._report_in_flight)
        app.on_rebalance_complete.connect(self._on_rebalance_complete)

    # --- agents -------------------------------------------------------------------------------

    async def _route_triggers(self, stream: faust.StreamT) -> None:
        """Validate triggers and re-key them by run_id onto the coordinator topic."""
        async for event in stream.events():
            msg = event.message
            try:
                trigger = codec.decode(RunRequested, msg.value)
            except DecodeError as exc:
                await self.dlq.send(msg, f"bad trigger: {exc}")
                continue
            run_id = trigger.run_id or run_id_for(msg.topic, msg.partition, msg.offset)
            accepted = RunAccepted(run_id=run_id, workflow=trigger.workflow, input=trigger.input, correlation_id=trigger.correlation_id, parent=trigger.parent)
            for attempt in range(_IO_ATTEMPTS):
                try:
                    await self._send(self.topics.coordinator, run_id.encode(), codec.dumps(accepted))
                    break
                except Exception as exc:  # the broker is away: keep the trigger, don't crash the agent
                    log.warning("cannot route trigger %s:%s@%s (%s); retrying", msg.topic, msg.partition, msg.offset, exc)
                    if attempt == _IO_ATTEMPTS - 1:
                        await self.dlq.send(msg, f"internal error: cannot route the trigger: {type(exc).__name__}: {exc}")
                    else:
                        await asyncio.sleep(min(10.0, 0.5 * 2**attempt))

    async def _coordinate(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            msg = event.message
            received = time.perf_counter()
            try:
                record = self._decode(msg.topic, msg.value)
            except DecodeError as exc:
                await self.dlq.send(msg, f"bad {'completion' if msg.topic == self.topics.completions else 'coordinator record'}: {exc}")
                continue
            if msg.partition != self._partition_of(record.run_id):
                # A producer that did not key by run_id (or used another partitioner): move the record to the
                # run's partition instead of splitting the run's state.
                await self._topic(msg.topic).send(key=record.run_id.encode(), value=msg.value)
                self._count_ignored("rekeyed")
                continue
            for attempt in range(_IO_ATTEMPTS):
                try:
                    await self._apply(record, msg, received)
                    break
                except _DecisionFailed as exc:  # a bug in deciding this event must not stop every other run
                    log.exception("coordinator failed to decide %s:%s@%s", msg.topic, msg.partition, msg.offset)
                    await self.dlq.send(msg, f"internal error: {exc}")
                    break
                except Exception as exc:
                    # Storing or sending failed (broker away, a topic missing): the event is fine, so retry it
                    # rather than dead-letter it. A retry after a partial write is recognised as a replay.
                    delay = min(10.0, 0.5 * 2**attempt)
                    log.warning("coordinator could not store or send for %s:%s@%s (%s: %s); retrying in %.1fs",
                                msg.topic, msg.partition, msg.offset, type(exc).__name__, exc, delay)
                    if attempt == _IO_ATTEMPTS - 1:
                        await self.dlq.send(msg, f"internal error after {_IO_ATTEMPTS} attempts: {type(exc).__name__}: {exc}")
                    else:
                        await asyncio.sleep(delay)

    async def _apply(self, record: Any, msg: Any, received: float | None = None) -> None:
        key = record.run_id.encode()
        raw = self.table.get(key)
        state = self._load(record.run_id, raw)
        position = f"{msg.topic}:{msg.partition}"
        if state is not None and state.cursor.get(position, -1) >= msg.offset:
            # Redelivered after a crash: the state already holds this event. Its commands may have been lost
            # with the process, so re-issue what the run is waiting on (ids are deterministic; duplicates drop).
            wf = self.machine.workflows.get(state.workflow)
            completion_topic = wf.definition.completion_topic if wf else None
            commands = outstanding(state, completion_topic) if state.cursor[position] == msg.offset else []
            self._count_ignored("replayed")
            await self._carry_out(commands)
            return
        now = now_ms()
        before = self.metrics.snapshot(state) if self.metrics is not None else state
        # The decision changes the decoded object in place (a deep copy costs more than the decision), so it
        # leaves the cache until its bytes are in the table: a retry after a failed write must decode the table's
        # bytes again, not reuse an object that already holds this event.
        self._states.pop(record.run_id, None)
        try:
            new_state, commands = self.machine.decide(state, record, now, in_place=True)
        except Exception as exc:
            raise _DecisionFailed(f"{type(exc).__name__}: {exc}") from exc
        unchanged = bool(commands) and all(isinstance(c, EventIgnored) for c in commands)
        if new_state is not None and not unchanged:
            new_state.cursor[position] = msg.offset
            stored = new_state.model_dump_json(exclude_defaults=True).encode()
            self.table[key] = stored
            self._remember(record.run_id, stored, new_state)
        await self._carry_out(commands)
        if self.metrics is not None:
            kind = {ActivityCompleted: "completion", TimerFired: "timer", ChildRunFinished: "child"}.get(type(record), "trigger")
            self.metrics.event_processed(kind)
            overhead = time.perf_counter() - received if kind == "completion" and received is not None else None
            self.metrics.decision(before, new_state, commands, now, overhead)

    async def _send(self, topic: str, key: bytes, value: bytes) -> None:
        # Straight to the app's producer: faust's Topic.send builds channel and sensor objects per message,
        # which cost more than the decision. Same producer, so the flush before each offset commit covers it.
        await self.app.producer.send(topic, key, value, partition=None, timestamp=None, headers=None)

    async def _carry_out(self, commands: list[Any]) -> None:
        for command in commands:
            if isinstance(command, RequestActivity):
                req = command.request
                await self._send(self.topics.requests(req.activity), req.run_id.encode(), codec.dumps(req))
            elif isinstance(command, StartTimer):
                self.timers.schedule(command.run_id, command.timer_id, command.due_ms)
            elif isinstance(command, PublishRunEvent):
                value = codec.dumps(command.event)
                await self._send(self.topics.runs, command.event.run_id.encode(), value)
                if command.completion_topic:
                    await self._send(command.completion_topic, command.event.run_id.encode(), value)
            elif isinstance(command, CancelRequest):
                c = command.cancel
                await self._send(self.topics.cancellations, c.run_id.encode(), codec.dumps(c))
            elif isinstance(command, StartChildRun):
                a = command.accepted
                await self._send(self.topics.coordinator, a.run_id.encode(), codec.dumps(a))
            elif isinstance(command, NotifyParent):
                f = command.finished
                await self._send(self.topics.coordinator, f.run_id.encode(), codec.dumps(f))
            elif isinstance(command, EventIgnored):
                self._count_ignored(command.reason)
                log.info("ignored event for run %s: %s %s", command.run_id, command.reason, command.detail)

    # --- timers -------------------------------------------------------------------------------

    async def _fire_timers(self) -> None:
        for run_id, timer_id in self.timers.due(now_ms()):
            raw = self.table.get(run_id.encode())
            if raw is None or f'"{timer_id}"' not in raw.decode():
                continue  # finished or cleared since it was set
            await self.coordinator_topic.send(key=run_id.encode(), value=codec.dumps(TimerFired(run_id=run_id, timer_id=timer_id)))

    async def _report_in_flight(self) -> None:
        self.metrics.runs_in_flight(count_in_flight(list(self.table.values())))

    async def _on_rebalance_complete(self, *args: Any, **kwargs: Any) -> None:
        """Re-arm the timers of every run this process now holds: they survive restarts and takeovers."""
        count = 0
        for key, raw in list(self.table.items()):
            if raw is None or b'"timers"' not in raw:
                continue
            state = RunState.model_validate_json(raw)
            for timer_id, timer in state.timers.items():
                self.timers.schedule(state.run_id, timer_id, timer.due_ms)
                count += 1
        log.info("re-armed %d timers after rebalance", count)

    # --- helpers ------------------------------------------------------------------------------

    def _load(self, run_id: str, raw: bytes | None) -> RunState | None:
        """The run's state, reusing the object decoded last time while the table still holds those bytes."""
        if raw is None:
            return None
        cached = self._states.get(run_id)
        if cached is not None and cached[0] is raw:
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
        raise DecodeError(f"unknown record type {kind!r}")

    def _partition_of(self, run_id: str) -> int:
        key = run_id.encode()
        return self._partitioner(key, list(range(self.partitions)), list(range(self.partitions)))

    def _topic(self, name: str) -> faust.TopicT:
        topic = self._out_topics.get(name)
        if topic is None:
            topic = self._out_topics[name] = self.app.topic(name, key_serializer="raw", value_serializer="raw")
        return topic

    def _count_ignored(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.ignored(reason)
