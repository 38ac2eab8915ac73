"""A worker stopped with SIGTERM while its handlers run drains: the handlers finish, their completions are delivered
and committed, and only then does it leave its group, so the worker that takes its partitions runs none of them again.

Before the drain a stopping worker left at once: the handlers it was running were cancelled and their requests ran
again on the next owner (a second ``activity.started`` and a second execution of each).
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
import warnings
from collections import Counter

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from legato.tools.diag.worker_offsets import topics_exist
from legato.topics import codec
from legato.topics.models import ActivityRequested
from legato.topics.names import Topics

from .conftest import _start

pytestmark = pytest.mark.asyncio(loop_scope="session")
ACTIVITY = "e2e_sleep"
PARTITIONS = 4
SLEEP_S = 3.0


def _worker(name: str, env: dict[str, str], tmp_path):
    return _start(name, ["worker", "--handlers", "tests.integration.e2e_handlers", "--activity", ACTIVITY], env, tmp_path)


class _Completions:
    """Every record of the completions topic, tallied per request_id: handler starts (``activity.started``, each
    request asks for one) and completions."""

    def __init__(self, bootstrap: str, topic: str):
        self.consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", isolation_level="read_committed")
        self.started: Counter = Counter()
        self.completed: Counter = Counter()
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "_Completions":
        await self.consumer.start()
        self.task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()

    async def _read(self) -> None:
        async for rec in self.consumer:
            try:
                value = orjson.loads(rec.value)
            except orjson.JSONDecodeError:
                continue
            kind = value.get("type")
            if kind == "activity.started":
                self.started[value["request_id"]] += 1
            elif kind in (None, "activity.completed"):
                self.completed[value["request_id"]] += 1

    async def wait(self, what: str, ids: list[str], timeout: float) -> bool:
        counts = getattr(self, what)
        deadline = time.monotonic() + timeout
        while not all(counts[i] for i in ids):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True


async def _send(bootstrap: str, topics: Topics, n: int, seconds: float, tag: str) -> list[str]:
    """``n`` requests of ``seconds`` each, spread over the partitions, each asking for ``activity.started``."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    ids = []
    try:
        for i in range(n):
            rid = uuid.uuid4().hex
            now = int(time.time() * 1000)
            req = ActivityRequested(request_id=f"{rid}/s/1", run_id=rid, step_id="s", activity=ACTIVITY, attempt=1,
                                    input={"seconds": seconds, "tag": f"{tag}{i}"}, requested_ms=now, run_started_ms=now,
                                    report_started=True)
            await producer.send_and_wait(topics.requests(ACTIVITY), codec.dumps(req), key=rid.encode(), partition=i % PARTITIONS)
            ids.append(req.request_id)
    finally:
        await producer.stop()
    return ids


async def test_a_worker_stopped_with_sigterm_finishes_its_running_handlers_and_none_runs_again(kafka_bootstrap, tmp_path):
    topics = Topics(f"wd{uuid.uuid4().hex[:10]}")
    env = {**os.environ, "LEGATO_BOOTSTRAP": kafka_bootstrap, "LEGATO_TOPIC_PREFIX": topics.prefix, "LEGATO_PARTITIONS": str(PARTITIONS),
           "LEGATO_LOGLEVEL": "info", "PYTHONUNBUFFERED": "1", "LEGATO_WORKER_DRAIN_S": "30"}
    first = _worker("first", env, tmp_path)
    second = None
    try:
        await topics_exist(kafka_bootstrap, [topics.requests(ACTIVITY), topics.completions])
        async with _Completions(kafka_bootstrap, topics.completions) as seen:
            probe = await _send(kafka_bootstrap, topics, PARTITIONS, 0.0, "probe")
            assert await seen.wait("completed", probe, 180), "the first worker answered nothing within 180 s:\n" + first.logs()

            running = await _send(kafka_bootstrap, topics, 2 * PARTITIONS, SLEEP_S, "running")
            assert await seen.wait("started", running, 30), "the handlers did not start:\n" + first.logs()
            first.proc.send_signal(signal.SIGTERM)  # every handler is asleep in its 3 s
            t_term = time.monotonic()
            second = _worker("second", env, tmp_path)  # joins while the first drains: the group rebalances meanwhile
            await asyncio.sleep(0.5)
            later = await _send(kafka_bootstrap, topics, PARTITIONS, 0.5, "later")  # sent while the first is stopping

            try:
                exit_code = await asyncio.to_thread(first.proc.wait, 60)
            except subprocess.TimeoutExpired:
                pytest.fail("the first worker was still running 60 s after its SIGTERM:\n" + first.logs())
            stopped_after = time.monotonic() - t_term
            assert await seen.wait("completed", running + later, 120), "unanswered requests:\n" + first.logs() + second.logs()
            # the second worker owns every partition now; had anything been left uncommitted, it runs again by now
            check = await _send(kafka_bootstrap, topics, PARTITIONS, 0.0, "check")
            assert await seen.wait("completed", check, 120), "the second worker answered nothing:\n" + second.logs()
            await asyncio.sleep(SLEEP_S + 1.0)

            assert exit_code == 0, first.logs()
            if "exiting with code" in first.stderr.read_text(errors="replace"):
                # the guarantee held (drained, committed, stopped in time); faust's own stop hung and the stop deadline
                # ended it: worth a look (its stacks are in the log), not a failure
                warnings.warn(f"the first worker's stop reached its deadline; stacks in {first.stderr}")
            assert stopped_after < 25, f"the first worker took {stopped_after:.1f} s to stop"
            twice = {i: (seen.started[i], seen.completed[i]) for i in running + later if (seen.started[i], seen.completed[i]) != (1, 1)}
            assert not twice, (f"{len(twice)} of {len(running + later)} requests not executed exactly once, (handler starts, "
                               f"completions): {sorted(Counter(twice.values()).items())}\n" + first.logs())
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_a_stop_that_outlasts_its_deadline_is_ended_with_every_stack_logged(kafka_bootstrap, tmp_path):
    """LEGATO_WORKER_STOP_S bounds what follows the drain (faust's stop: leave the group, stop the consumer thread),
    which can hang on a rebalance. Here the bound is shorter than a healthy stop, so it must fire: the process exits
    with 0 (the drain committed), having written where it was."""
    topics = Topics(f"wd{uuid.uuid4().hex[:10]}")
    env = {**os.environ, "LEGATO_BOOTSTRAP": kafka_bootstrap, "LEGATO_TOPIC_PREFIX": topics.prefix, "LEGATO_PARTITIONS": str(PARTITIONS),
           "LEGATO_LOGLEVEL": "info", "PYTHONUNBUFFERED": "1", "LEGATO_WORKER_STOP_S": "0.05"}
    worker = _worker("short", env, tmp_path)
    try:
        await topics_exist(kafka_bootstrap, [topics.requests(ACTIVITY), topics.completions])
        async with _Completions(kafka_bootstrap, topics.completions) as seen:
            probe = await _send(kafka_bootstrap, topics, PARTITIONS, 0.0, "probe")
            assert await seen.wait("completed", probe, 180), "the worker answered nothing within 180 s:\n" + worker.logs()
        worker.proc.send_signal(signal.SIGTERM)
        try:
            exit_code = await asyncio.to_thread(worker.proc.wait, 30)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker was still running 30 s after its SIGTERM:\n" + worker.logs())
        log = worker.stderr.read_text(errors="replace")
        assert "stopping: drained in" in log, worker.logs()
        assert "exiting with code 0" in log, worker.logs()
        assert "Current thread 0x" in log and "Stack for <Task" in log, "no thread or task stacks:\n" + worker.logs()
        assert exit_code == 0, worker.logs()
    finally:
        worker.stop()
