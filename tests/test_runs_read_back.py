"""load_run reads a changelog partition back from its end in doubling windows (legato.streams.runs.last_of_key):
the logic against a fake partition, then the same answers as a full scan on a real broker."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from legato.streams import runs
from legato.streams.metrics import Metrics
from legato.streams.runs import last_of_key, load_run, windows
from legato.topics.names import Topics
from tests.test_metrics import TRIAGE, Run, drive_triage, machine


@dataclass(frozen=True)
class Rec:
    offset: int
    key: bytes
    value: bytes | None


class FakePartition:
    """Records at offsets [start, end) (a gap where a transaction marker would sit); each read goes on past ``hi``
    by up to ``overshoot`` records, as a fetched batch does."""

    def __init__(self, records: list[Rec], overshoot: int = 3):
        self.records = records
        self.overshoot = overshoot
        self.reads: list[tuple[int, int]] = []

    async def read(self, lo: int, hi: int, on_record: Callable[[Any], None]) -> None:
        self.reads.append((lo, hi))
        late = 0
        for r in self.records:
            if r.offset < lo:
                continue
            if r.offset >= hi:
                late += 1
                if late > self.overshoot:
                    break
            on_record(r)


def _full_scan(records: list[Rec], key: bytes) -> Rec | None:
    found = [r for r in records if r.key == key]
    return found[-1] if found else None


def test_windows_cover_the_range_once_newest_first_doubling():
    assert list(windows(0, 10, first=2)) == [(8, 10), (4, 8), (0, 4)]
    assert list(windows(5, 5, first=2)) == []
    assert list(windows(3, 4, first=2)) == [(3, 4)]
    spans = list(windows(100, 100_000))
    assert spans[0] == (98_000, 100_000) and spans[1] == (94_000, 98_000)
    assert spans[-1][0] == 100
    assert all(a[0] == b[1] for a, b in zip(spans, spans[1:]))


def _partition(n: int, keys: int) -> list[Rec]:
    # every 7th offset is a transaction marker: no record
    return [Rec(o, f"k{o % keys}".encode(), f"{o}".encode()) for o in range(n) if o % 7 != 6]


@pytest.mark.parametrize("first", [1, 2, 5, 64])
async def test_same_answer_as_a_full_scan_for_every_key(first: int):
    records = _partition(300, 13) + [Rec(300, b"early", b"x")]
    records = [Rec(0, b"early", b"first")] + [r for r in records if r.offset != 0]
    records.append(Rec(301, b"k3", None))  # a tombstone is the last record of k3
    for key in [f"k{i}".encode() for i in range(13)] + [b"early", b"unknown"]:
        fake = FakePartition(records)
        assert await last_of_key(fake.read, 0, 302, key, first=first) == _full_scan(records, key), key


async def test_a_recent_run_reads_one_window_and_an_unknown_one_reads_everything():
    records = _partition(10_000, 50)
    fake = FakePartition(records)
    found = await last_of_key(fake.read, 0, 10_000, b"k7", first=100)
    assert found is not None and found.offset == max(r.offset for r in records if r.key == b"k7")
    assert fake.reads == [(9_900, 10_000)]
    fake = FakePartition(records)
    assert await last_of_key(fake.read, 0, 10_000, b"nope", first=100) is None
    assert fake.reads[-1][0] == 0 and sum(hi - lo for lo, hi in fake.reads) == 10_000


async def test_a_record_read_past_the_window_does_not_hide_an_older_one():
    # the newest window [4, 6) holds no "a"; its read overshoots into nothing; the next [0, 4) holds a at 1 and 3
    records = [Rec(0, b"b", b"0"), Rec(1, b"a", b"1"), Rec(2, b"b", b"2"), Rec(3, b"a", b"3"), Rec(4, b"b", b"4"), Rec(5, b"b", b"5")]
    fake = FakePartition(records)
    assert (await last_of_key(fake.read, 0, 6, b"a", first=2)).value == b"3"
    # a window's overshoot onto a newer record of the key would answer an older one wrongly if not ignored
    fake = FakePartition([Rec(0, b"a", b"old"), Rec(1, b"b", b""), Rec(2, b"b", b""), Rec(3, b"a", b"new")])
    assert (await last_of_key(fake.read, 0, 3, b"a", first=2)).value == b"old"


async def test_the_log_start_offset_bounds_the_read():
    records = [Rec(o, b"a" if o == 120 else b"b", b"v") for o in range(100, 200)]
    fake = FakePartition(records)
    assert (await last_of_key(fake.read, 100, 200, b"a", first=8)).offset == 120
    assert min(lo for lo, _ in fake.reads) >= 100


async def test_load_run_reads_back_in_windows_on_a_broker(kafka_bootstrap, monkeypatch):
    """Transactional writes (markers take offsets), the run's last state far behind the end, a tombstone, an
    unknown run: the same answers with windows of 4 records as with one scan."""
    monkeypatch.setattr(runs, "FIRST_WINDOW", 4)
    prefix = f"rb{uuid.uuid4().hex[:10]}"
    topic = Topics(prefix).changelog
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    old = drive_triage(Metrics(), run_id="run-old")
    running = Run(machine(TRIAGE), Metrics(), "run-old")
    running.start("triage", {"text": "x"})
    filler = drive_triage(Metrics(), run_id="filler").state.model_dump_json().encode()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"{prefix}-tx")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, running.state.model_dump_json().encode(), key=b"run-old")
            await producer.send(topic, old.state.model_dump_json().encode(), key=b"run-old")
            await producer.send(topic, filler, key=b"run-gone")
        for i in range(20):
            async with producer.transaction():
                await producer.send(topic, filler, key=f"filler-{i}".encode())
                await producer.send(topic, filler, key=f"filler-{i}".encode())
        async with producer.transaction():
            await producer.send(topic, None, key=b"run-gone")
            await producer.send(topic, filler, key=b"filler-last")
    finally:
        await producer.stop()
    state = await load_run(kafka_bootstrap, prefix, "run-old")
    assert state is not None and state.model_dump() == old.state.model_dump()
    assert await load_run(kafka_bootstrap, prefix, "run-gone") is None
    assert await load_run(kafka_bootstrap, prefix, "unknown") is None
    assert (await load_run(kafka_bootstrap, prefix, "filler-last")).run_id == "filler"
