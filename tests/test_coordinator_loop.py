"""streams/coordinator/loop.py and rebalance.py on their own: the consume loop, a partition's task loop and the
rebalance listener against a fake consumer, fake producers and a fake decision step (no broker, no sleeps)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from legato.streams.coordinator import loop as loop_module
from legato.streams.coordinator.loop import Coordinator
from legato.streams.coordinator.rebalance import Rebalance
from legato.streams.coordinator.task import PartitionTask
from legato.topics.names import Topics

INPUTS = ["lg.triggers", "lg.coordinator"]


class FakeConsumer:
    def __init__(self, partitions: list[int], polls: list[dict[TopicPartition, list[Any]]] | None = None):
        self._assignment = {TopicPartition(t, p) for t in INPUTS for p in partitions}
        self.polls = list(polls or [])
        self.paused: set[TopicPartition] = set()
        self.seeks: dict[TopicPartition, int] = {}
        self._coordinator = SimpleNamespace(member_id="m1", generation=1)  # what group_membership reads

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        if not self.polls:
            raise asyncio.CancelledError  # ends the loop under test
        return self.polls.pop(0)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused -= set(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp] = offset


class FakeProducer:
    def __init__(self) -> None:
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True


class FakeStore:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakePartitions:
    """The decision step: records what each turn was handed; ``why`` makes a turn fail (the task is reloaded)."""

    def __init__(self, why: str | None = None):
        self.turns: list[list[Any]] = []
        self.why = why
        self.forgotten = 0

    async def process(self, task: PartitionTask, parts: list, more: Any) -> str | None:
        self.turns.append([r for _, records, _ in parts for r in records])
        return self.why

    async def flush_group_offsets(self, task: PartitionTask) -> None:
        task.group_offsets_behind = False

    def forget(self) -> None:
        self.forgotten += 1


class FakeRebalance:
    def __init__(self, pending: int = 0, opens: list[bool] | None = None):
        self._pending = pending
        self.opens = list(opens or [])
        self.reloads: list[tuple[int, str]] = []

    @property
    def pending(self) -> bool:
        return self._pending > 0

    async def open_pending(self) -> bool:
        ok = self.opens.pop(0) if self.opens else True
        if ok:
            self._pending -= 1
        return ok

    async def reload(self, task: PartitionTask, why: str) -> None:
        self.reloads.append((task.partition, why))


def _coordinator(consumer: FakeConsumer, partitions: FakePartitions | None = None) -> Coordinator:
    c = Coordinator.__new__(Coordinator)  # no settings, no Kafka clients: only what the loops use
    c.tasks = {}
    c.inputs = INPUTS
    c._consumer = consumer
    c.partitions = partitions or FakePartitions()
    c.rebalance = FakeRebalance()
    c.settings = SimpleNamespace(store="memory")
    c.partition_count = 4
    c.topics = Topics("lg")
    return c


def _task(p: int) -> PartitionTask:
    return PartitionTask(p, FakeProducer(), FakeStore())


def _records(topic: str, p: int, n: int, start: int = 0) -> dict[TopicPartition, list[Any]]:
    return {TopicPartition(topic, p): [SimpleNamespace(offset=start + i, timestamp=1_000 + start + i, value=b"{}") for i in range(n)]}


async def test_the_consume_loop_hands_each_partitions_records_to_its_task():
    consumer = FakeConsumer([0, 1], polls=[{**_records("lg.triggers", 0, 2), **_records("lg.coordinator", 1, 1), **_records("lg.triggers", 5, 3)}])
    c = _coordinator(consumer)
    t0, t1 = _task(0), _task(1)
    c.tasks.update({0: t0, 1: t1})
    with pytest.raises(asyncio.CancelledError):
        await c._consume()
    assert [len(records) for _, records, _ in t0.inbox] == [2] and t0.queued == 2 and t0.wake.is_set()
    assert t1.queued == 1 and t1.wake.is_set()
    assert consumer.paused == set()  # partition 5 has no task: its records are left to its owner
    assert list(t0.marks.triggers) == [(0, 1_000), (1, 1_001)] and not t1.marks.triggers  # undecided triggers (coordinator.marks)


async def test_a_full_queue_pauses_its_partition_until_taken(monkeypatch):
    monkeypatch.setattr(loop_module, "_MAX_QUEUED", 3)
    consumer = FakeConsumer([0, 1], polls=[_records("lg.triggers", 0, 2), _records("lg.coordinator", 0, 2, start=2)])
    c = _coordinator(consumer)
    task = _task(0)
    c.tasks[0] = task
    with pytest.raises(asyncio.CancelledError):
        await c._consume()
    assert task.paused and consumer.paused == {TopicPartition(t, 0) for t in INPUTS}
    parts = c._take(task)
    assert sum(len(r) for _, r, _ in parts) == 4 and task.queued == 0 and task.inbox == []
    assert not task.paused and consumer.paused == set()


async def test_pending_partitions_are_opened_before_polling_with_back_off(monkeypatch):
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    monkeypatch.setattr(loop_module.asyncio, "sleep", sleep)
    consumer = FakeConsumer([0], polls=[{}, {}, {}])
    c = _coordinator(consumer)
    c.rebalance = FakeRebalance(pending=1, opens=[False, False, True])
    with pytest.raises(asyncio.CancelledError):
        await c._consume()
    assert not c.rebalance.pending
    assert slept == [0.2, 0.4]  # doubling while the broker is away


async def test_a_task_decides_what_was_queued_and_ends_when_closed():
    c = _coordinator(FakeConsumer([0]))
    task = _task(0)
    c.start(task)
    task.inbox.append((TopicPartition("lg.triggers", 0), ["a", "b"], 0.0))
    task.wake.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert c.partitions.turns == [["a", "b"]]
    del c.tasks[0]
    task.wake.set()
    await asyncio.wait_for(task.loop, 1)


async def test_a_failed_turn_reloads_the_partition():
    c = _coordinator(FakeConsumer([0]), FakePartitions(why="ProducerFenced"))
    task = _task(0)
    c.start(task)
    task.inbox.append((TopicPartition("lg.triggers", 0), ["a"], 0.0))
    task.wake.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert c.rebalance.reloads == [(0, "ProducerFenced")]
    del c.tasks[0]
    task.wake.set()
    await asyncio.wait_for(task.loop, 1)


async def test_an_idle_task_brings_the_groups_offsets_up_to_date(monkeypatch):
    monkeypatch.setattr(loop_module, "GROUP_OFFSETS_EVERY_S", 0)
    c = _coordinator(FakeConsumer([0]))
    task = _task(0)
    task.group_offsets_behind = True
    c.start(task)
    for _ in range(10):
        await asyncio.sleep(0)
        if not task.group_offsets_behind:
            break
    assert not task.group_offsets_behind
    del c.tasks[0]
    task.wake.set()
    await asyncio.wait_for(task.loop, 1)


# --- the rebalance listener ---------------------------------------------------------------------------


def _rebalanced(partitions: list[int]) -> tuple[Coordinator, Rebalance, FakeConsumer]:
    consumer = FakeConsumer(partitions)
    c = _coordinator(consumer)
    rebalance = Rebalance(c)
    c.rebalance = rebalance
    return c, rebalance, consumer


def _tps(*partitions: int) -> list[TopicPartition]:
    return [TopicPartition(t, p) for t in INPUTS for p in partitions]


async def _stop_loops(c: Coordinator) -> None:
    tasks = list(c.tasks.values())
    c.tasks.clear()
    for t in tasks:
        t.wake.set()
        if t.loop is not None:
            await asyncio.wait_for(t.loop, 1)


async def test_a_revoked_task_assigned_back_in_the_next_generation_is_reused_from_its_offsets():
    c, rebalance, consumer = _rebalanced([0, 1])
    t0, t1 = _task(0), _task(1)
    t0.next_offset = {TopicPartition("lg.triggers", 0): 17}
    t0.inbox, t0.queued = [("x", ["dropped"], 0.0)], 1
    c.start(t0)
    c.start(t1)
    await rebalance.on_partitions_revoked(_tps(0, 1))
    assert c.tasks == {} and t0.inbox == [] and t0.queued == 0
    consumer._coordinator.generation = 2
    await rebalance.on_partitions_assigned(_tps(0))
    assert c.tasks == {0: t0} and not t0.producer.stopped
    assert consumer.seeks == {TopicPartition("lg.triggers", 0): 17}  # what it dropped is read again
    assert t1.producer.stopped and t1.store.closed  # not assigned back: closed
    assert not rebalance.pending
    await _stop_loops(c)


async def test_after_a_missed_generation_parked_tasks_are_closed_and_their_partitions_opened_afresh():
    c, rebalance, consumer = _rebalanced([0])
    t0 = _task(0)
    c.start(t0)
    await rebalance.on_partitions_revoked(_tps(0))
    consumer._coordinator.generation = 3  # another member may have owned partition 0 in between
    await rebalance.on_partitions_assigned(_tps(0))
    assert t0.producer.stopped and t0.store.closed and c.tasks == {}
    assert rebalance.pending and consumer.paused == set(_tps(0))
    assert c.partitions.forgotten == 1
    await asyncio.wait_for(t0.loop, 1)


async def test_reload_closes_the_task_and_pauses_its_partition_until_reopened():
    c, rebalance, consumer = _rebalanced([2])
    t2 = _task(2)
    c.start(t2)
    await rebalance.reload(t2, "boom")
    assert c.tasks == {} and t2.producer.stopped and rebalance.pending
    assert consumer.paused == set(_tps(2))
    await asyncio.wait_for(t2.loop, 1)

    opened: list[int] = []

    async def open_task(p: int) -> None:
        opened.append(p)

    rebalance._open_task = open_task
    assert await rebalance.open_pending()
    assert opened == [2] and not rebalance.pending and consumer.paused == set()


async def test_a_partition_that_cannot_be_opened_stays_pending():
    c, rebalance, consumer = _rebalanced([1])
    await rebalance.on_partitions_assigned(_tps(1))
    assert rebalance.pending and consumer.paused == set(_tps(1))

    async def broker_away(p: int) -> None:
        raise ConnectionError("no broker")

    rebalance._open_task = broker_away
    assert not await rebalance.open_pending()
    assert rebalance.pending and consumer.paused == set(_tps(1))
