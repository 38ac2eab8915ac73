"""``legato bench runs-show``: reading one run back from a long changelog partition, the way ``legato runs show``,
``redrive --wait`` and ``fork --wait`` do.

One changelog partition holds N records (``--memory-runs``, default 100,000): states of N/10 runs, ten states each,
written run after run in transactions of 500 records like a coordinator's. Then each of four runs is read five times
with ``load_run`` (back from the end in doubling windows) and with the baseline, the former reader (one scan of the
partition from offset 0), alternately, in the same process: the run written last, one written in the middle, the
first, and an unknown run. Reported: the median wall time of each.
"""
from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from legato.streams import kafka_io, security
from legato.streams.runs import FIRST_WINDOW, load_run
from legato.tools.bench import Bench, Report, Row, _done, _progress
from legato.workflows.state import RunState

STATES_PER_RUN = 10
TRANSACTION = 500
REPEATS = 5


def _state(run_id: str, i: int) -> bytes:
    state = RunState(run_id=run_id, workflow="bench_runs_show", version=1, started_ms=1_700_000_000_000 + i,
                     input={"text": "x" * 200}, path=[f"s{k}" for k in range(i % STATES_PER_RUN)])
    return state.model_dump_json().encode()


async def _fill(bootstrap: str, topic: str, records: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security.aiokafka_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"{topic}-fill", linger_ms=5, **security.aiokafka_kwargs())
    await producer.start()
    try:
        for lo in range(0, records, TRANSACTION):
            async with producer.transaction():
                for n in range(lo, min(records, lo + TRANSACTION)):
                    await producer.send(topic, _state(f"run-{n // STATES_PER_RUN}", n), key=f"run-{n // STATES_PER_RUN}".encode())
            _progress(f"runs-show: {min(records, lo + TRANSACTION)}/{records} changelog records written")
    finally:
        await producer.stop()
    _done()


async def load_run_full_scan(bootstrap: str, topic: str, run_id: str) -> RunState | None:
    """The baseline: the former ``load_run``, which read the key's partition from offset 0 to its end."""
    key, last = run_id.encode(), None
    found = False

    def keep(record: Any) -> None:
        nonlocal found, last
        if record.key == key:
            found, last = True, record.value

    consumer = kafka_io.reader(bootstrap, **security.aiokafka_kwargs())
    try:
        await consumer.start()
        partitions = await kafka_io.partitions_of(consumer, topic)
        await kafka_io.read_partition(consumer, TopicPartition(topic, kafka_io.partition_for(key, len(partitions))), keep, timeout=300)
    finally:
        await consumer.stop()
    return None if not found or last is None else RunState.model_validate_json(last)


def bench_runs_show(b: Bench, records: int) -> Report:
    topics = b.named("runsshow")
    runs = records // STATES_PER_RUN
    asyncio.run(_fill(b.settings.bootstrap, topics.changelog, records))
    cases = [("the run written last", f"run-{runs - 1}"), ("a run written in the middle", f"run-{runs // 2}"),
             ("the run written first", "run-0"), ("an unknown run", "no-such-run")]
    report = Report(f"legato bench runs-show --memory-runs {records}")

    async def measure() -> None:
        for label, run_id in cases:
            new, old = [], []
            for _ in range(REPEATS):
                t = time.perf_counter()
                windowed = await load_run(b.settings.bootstrap, topics.prefix, run_id, timeout=300)
                new.append(time.perf_counter() - t)
                t = time.perf_counter()
                scanned = await load_run_full_scan(b.settings.bootstrap, topics.changelog, run_id)
                old.append(time.perf_counter() - t)
                same = (windowed is None and scanned is None) or (windowed is not None and scanned is not None
                                                                   and windowed.model_dump() == scanned.model_dump())
                if not same:
                    raise AssertionError(f"load_run and the full scan disagree on {run_id}")
            n, o = statistics.median(new) * 1000, statistics.median(old) * 1000
            _progress(f"runs-show: {label}: {n:.0f} ms windowed, {o:.0f} ms full scan")
            report.rows.append(Row(f"load_run, {label}", f"{n:.0f} ms", f"{o:.0f} ms (scan from offset 0)", f"{n / o:.3f}", "report", "-"))
        _done()

    asyncio.run(measure())
    report.notes.append(f"One changelog partition of {records:,} records: {runs:,} runs × {STATES_PER_RUN} states (about "
                        f"{len(_state('run-0', 0))} bytes each), written run after run in transactions of {TRANSACTION}. Median of "
                        f"{REPEATS} reads each, windowed and baseline alternately, each with its own consumer; first window "
                        f"{FIRST_WINDOW:,} records, doubling. Both readers returned the same state (or none) every time.")
    return report
