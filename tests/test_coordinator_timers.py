"""streams/coordinator/timers.py on its own: the in-memory heap, re-arming from stored states, and one round of
firing (``_fire_due``) against fake tasks, a fake producer and a fake answer fence (no broker, no sleeps)."""
from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest

from legato.streams.coordinator import timers as timers_module
from legato.streams.coordinator.timers import Timers, _fire_due
from legato.topics import codec
from legato.topics.models import TimerFired
from legato.workflows import keys

T = 1_000_000


def test_due_timers_come_out_in_due_order_once():
    t = Timers()
    t.schedule("r1", "b", T + 20)
    t.schedule("r2", "a", T + 10)
    t.schedule("r1", "b", T + 5)  # already scheduled: ignored
    t.schedule("r3", "c", T + 30)
    assert t.due(T) == []
    assert t.due(T + 20) == [("r2", "a"), ("r1", "b")]
    assert t.due(T + 20) == []
    t.schedule("r1", "b", T + 25)  # fired: may be scheduled again
    assert t.due(T + 100) == [("r1", "b"), ("r3", "c")]


def _doc(run_id: str, status: str = "running", timers: dict[str, Any] | None = None, finished_ms: int | None = None) -> bytes:
    doc = {"run_id": run_id, "workflow": "w", "version": 1, "started_ms": T, "status": status, "timers": timers or {}}
    if finished_ms is not None:
        doc["finished_ms"] = finished_ms
    return orjson.dumps(doc)


def test_rearm_schedules_stored_timers_and_the_retention_of_old_finished_runs():
    t = Timers()
    t.rearm([
        _doc("running", timers={"s0:timeout:1": {"due_ms": T + 10, "kind": "timeout"}}),
        _doc("kept", "succeeded", timers={keys.RUN_RETENTION: {"due_ms": T + 20, "kind": "retention"}}, finished_ms=T),
        _doc("old", "failed", finished_ms=T),  # finished before runs had a retention timer
        _doc("idle"),
    ], retention_due=lambda state: state.finished_ms + 30)
    assert t.due(T + 100) == [("running", "s0:timeout:1"), ("kept", keys.RUN_RETENTION), ("old", keys.RUN_RETENTION)]


class FakeTask:
    def __init__(self, partition: int, store: dict[bytes, bytes]):
        self.partition = partition
        self.timers = Timers()
        self.store = store
        self.early_runs: Counter[str] = Counter()


class FakeProducer:
    def __init__(self, fail: bool = False):
        self.sent: list[tuple[str, Any, bytes]] = []
        self.fail = fail

    async def send(self, topic: str, value: bytes, key: bytes) -> None:
        if self.fail:
            raise ConnectionError("broker away")
        self.sent.append((topic, codec.decode(TimerFired, value), key))


def _pending_state(run_id: str, timer_id: str) -> bytes:
    return _doc(run_id, timers={timer_id: {"due_ms": 0, "kind": "timeout"}})


TIMEOUT = "s0:timeout:1"


def _setup(*runs: str, partition: int = 3) -> tuple[FakeTask, dict[int, FakeTask]]:
    task = FakeTask(partition, {r.encode(): _pending_state(r, TIMEOUT) for r in runs})
    for r in runs:
        task.timers.schedule(r, TIMEOUT, 0)  # due long ago
    return task, {partition: task}


def _look(pending: set[str] = frozenset(), marks: dict[int, int] | None = None, calls: list | None = None):
    async def look(requests: dict[str, int]) -> tuple[set[str], dict[int, int]]:
        if calls is not None:
            calls.append(dict(requests))
        return set(pending), dict(marks or {})
    return look


async def test_a_due_timeout_is_sent_with_its_partitions_completions_mark():
    task, tasks = _setup("r1")
    producer, calls = FakeProducer(), []
    await _fire_due(tasks, producer, "coord", _look(marks={3: 42}, calls=calls))
    assert calls == [{keys.request_id("r1", "s0", 1): 3}]
    assert producer.sent == [("coord", TimerFired(run_id="r1", timer_id=TIMEOUT, completions_offset=42), b"r1")]


async def test_a_timer_no_longer_in_the_stored_state_is_dropped():
    task, tasks = _setup("r1", "r2")
    task.store[b"r1"] = _doc("r1")  # the timer was cleared (the step finished)
    del task.store[b"r2"]  # the run was forgotten
    producer = FakeProducer()
    await _fire_due(tasks, producer, "coord", _look())
    assert producer.sent == [] and task.timers.due(10**15) == []


async def test_a_run_with_requests_ahead_of_its_transaction_waits():
    task, tasks = _setup("r1")
    task.early_runs["r1"] += 1
    producer = FakeProducer()
    await _fire_due(tasks, producer, "coord", _look())
    assert producer.sent == []
    assert task.timers.due(10**15) == [("r1", TIMEOUT)]  # rescheduled


async def test_an_answer_on_its_way_holds_the_timeout_back():
    task, tasks = _setup("r1", "r2")
    producer = FakeProducer()
    await _fire_due(tasks, producer, "coord", _look(pending={keys.request_id("r1", "s0", 1)}))
    assert [s[1].run_id for s in producer.sent] == ["r2"]
    assert task.timers.due(10**15) == [("r1", TIMEOUT)]


async def test_when_the_broker_is_away_every_timer_is_tried_again():
    task, tasks = _setup("r1")

    async def away(requests: dict[str, int]) -> tuple[set[str], dict[int, int]]:
        raise ConnectionError("no broker")

    producer = FakeProducer()
    await _fire_due(tasks, producer, "coord", away)
    assert producer.sent == [] and task.timers.due(10**15) == [("r1", TIMEOUT)]
    task.timers.schedule("r1", TIMEOUT, 0)
    await _fire_due(tasks, FakeProducer(fail=True), "coord", _look())
    assert task.timers.due(timers_module.now_ms() - 1) == []  # retried later, not at once
    assert task.timers.due(10**15) == [("r1", TIMEOUT)]


async def test_a_task_closed_while_looking_fires_nothing():
    task, tasks = _setup("r1")
    producer = FakeProducer()

    async def look(requests: dict[str, int]) -> tuple[set[str], dict[int, int]]:
        tasks[3] = FakeTask(3, {})  # reloaded meanwhile: the new task re-arms from the table
        return set(), {}

    await _fire_due(tasks, producer, "coord", look)
    assert producer.sent == []


async def test_a_finished_runs_retention_fires_and_a_running_runs_does_not():
    task = FakeTask(0, {b"done": _doc("done", "succeeded", finished_ms=T), b"busy": _doc("busy")})
    task.timers.schedule("done", keys.RUN_RETENTION, 0)
    task.timers.schedule("busy", keys.RUN_RETENTION, 0)
    producer, calls = FakeProducer(), []
    await _fire_due({0: task}, producer, "coord", _look(calls=calls))
    assert [(s[1].run_id, s[1].timer_id) for s in producer.sent] == [("done", keys.RUN_RETENTION)]
    assert calls == [{}]  # a retention timer answers no request: nothing to look for


@pytest.mark.parametrize("timer_id,guarded", [
    ("s0:timeout:2", "r/s0/2"), ("a/b:start_timeout:1", "r/a/b/1"), ("s0:heartbeat:3:7", "r/s0/3"), ("s0:retry:1", None),
])
def test_which_request_a_deadline_timer_guards(timer_id: str, guarded: str | None):
    assert keys.timed_out_request("r", timer_id) == guarded
