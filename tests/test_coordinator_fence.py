"""streams/coordinator/fence.py on its own: which due timeouts wait for an answer still on its way, against a fake
completions reader and fake committed offsets (no broker)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from legato.streams import kafka_io
from legato.streams.coordinator.fence import AnswerFence, answered

TOPIC = "lg.completions"


@dataclass
class Rec:
    offset: int
    value: bytes | None


class FakeReader:
    """The fence's completions reader: per partition a log of records (``read_uncommitted``: all of them)."""

    def __init__(self, logs: dict[int, list[bytes | None]]):
        self.logs = {TopicPartition(TOPIC, p): [Rec(o, v) for o, v in enumerate(values)] for p, values in logs.items()}
        self.positions: dict[TopicPartition, int] = {}
        self.seeks: list[tuple[int, int | None]] = []

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.logs.get(tp, [])) for tp in tps}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp.partition, offset))
        self.positions[tp] = offset

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.partition, None))
        self.positions[tp] = 0

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def getmany(self, *tps: TopicPartition, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Rec]]:
        out = {}
        for tp in tps:
            records = self.logs.get(tp, [])[self.positions[tp]:self.positions[tp] + 2]  # small batches
            if records:
                out[tp] = records
                self.positions[tp] = records[-1].offset + 1
        return out


class Task:
    def __init__(self, next_offset: dict[TopicPartition, int]):
        self.next_offset = next_offset


def completion(request_id: str, kind: str = "activity.completed") -> bytes:
    return orjson.dumps({"type": kind, "request_id": request_id, "status": "succeeded"})


def _fence(monkeypatch, logs: dict[int, list[bytes | None]], committed: dict[int, int], tasks: dict[int, Task] | None = None) -> tuple[AnswerFence, FakeReader]:
    async def committed_offsets(consumer: Any, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {TopicPartition(TOPIC, p): o for p, o in committed.items()}

    monkeypatch.setattr(kafka_io, "committed_offsets", committed_offsets)
    fence = AnswerFence("localhost:1", TOPIC, 3, group=lambda: None, tasks=tasks or {})
    reader = FakeReader(logs)
    fence._reader = reader
    return fence, reader


async def test_an_undecided_answer_on_another_partition_is_pending(monkeypatch):
    # r1's run lives on partition 0; its answer went to partition 1 (offset 2), which the group decided up to 1
    fence, reader = _fence(monkeypatch, {0: [], 1: [completion("x/a/1"), completion("y/a/1"), completion("r1/a/1")], 2: [completion("r2/a/1")]},
                           committed={1: 1, 2: 0})
    pending, marks = await fence.look({"r1/a/1": 0, "r2/a/1": 2, "r3/a/1": 0})
    assert pending == {"r1/a/1"}  # r2's answer is on its own run's partition: read there in order; r3 has none
    assert marks == {0: 0, 1: 3, 2: 1}


async def test_an_answer_already_decided_is_not_pending(monkeypatch):
    fence, _ = _fence(monkeypatch, {0: [], 1: [completion("r1/a/1"), completion("x/a/1")], 2: []}, committed={1: 1, 2: 0, 0: 0})
    assert (await fence.look({"r1/a/1": 0}))[0] == set()


async def test_this_processes_own_newer_offsets_count_as_decided(monkeypatch):
    tasks = {1: Task({TopicPartition(TOPIC, 1): 3})}
    fence, reader = _fence(monkeypatch, {0: [], 1: [completion("a/a/1"), completion("b/a/1"), completion("r1/a/1")], 2: []},
                           committed={1: 1, 0: 0, 2: 0}, tasks=tasks)
    assert (await fence.look({"r1/a/1": 0}))[0] == set()
    assert (1, 1) not in reader.seeks  # nothing of partition 1 left to read


async def test_a_started_or_heartbeat_record_is_no_answer(monkeypatch):
    fence, _ = _fence(monkeypatch, {0: [], 1: [completion("r1/a/1", "activity.started"), completion("r1/a/1", "activity.heartbeat"), None, b"not json r1/a/1"], 2: []},
                      committed={0: 0, 2: 0})
    assert (await fence.look({"r1/a/1": 0}))[0] == set()


async def test_a_partition_without_committed_offsets_is_read_from_its_beginning(monkeypatch):
    fence, reader = _fence(monkeypatch, {0: [], 1: [completion("r1/a/1")], 2: []}, committed={})
    assert (await fence.look({"r1/a/1": 2}))[0] == {"r1/a/1"}
    assert (1, None) in reader.seeks


async def test_without_due_timeouts_only_the_marks_are_taken(monkeypatch):
    fence, reader = _fence(monkeypatch, {0: [completion("r/a/1")], 1: [], 2: []}, committed={})
    assert await fence.look({}) == (set(), {0: 1, 1: 0, 2: 0})
    assert reader.seeks == []


@pytest.mark.parametrize("value,request_id", [
    (completion("r/a/1"), "r/a/1"),
    (completion("r/a/1", "activity.started"), None),
    (completion("r/a/1", "activity.heartbeat"), None),
    (b"[1, 2]", None),
    (b"{broken", None),
    (orjson.dumps({"type": "activity.completed", "request_id": 7}), None),
])
def test_answered(value: bytes, request_id: str | None):
    assert answered(value) == request_id
