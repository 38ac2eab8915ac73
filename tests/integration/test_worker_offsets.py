"""A worker's committed request offsets follow the requests it answered, on topics written in transactions.

The requests come from transactional producers, interleaved, one transaction in four aborted: what coordinators
write. faust's own acknowledgement bookkeeping left the committed offset hundreds of records behind (every rebalance
then ran those requests again); workers now commit themselves (streams/worker_offsets.py), every commit interval,
when they lose partitions and when they stop.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import pytest

from legato.tools.diag.worker_offsets import ACTIVITY, answered, committed_and_end, produce_requests, topics_exist
from legato.topics.names import Topics

from .conftest import _start

pytestmark = pytest.mark.asyncio(loop_scope="session")
PARTITIONS = 4


def _worker(name: str, env: dict[str, str], tmp_path):
    return _start(name, ["worker", "--handlers", "tests.integration.e2e_handlers", "--activity", ACTIVITY], env, tmp_path)


def _env(bootstrap: str, prefix: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "LEGATO_BOOTSTRAP": bootstrap, "LEGATO_TOPIC_PREFIX": prefix, "LEGATO_PARTITIONS": str(PARTITIONS),
            "LEGATO_LOGLEVEL": "info", "PYTHONUNBUFFERED": "1", **extra}


async def _behind(bootstrap: str, topics: Topics, last: dict[int, int], within: float) -> dict[int, int]:
    """Per partition, how far the group's committed offset is behind the offset after the last request on it, once
    that is 0 everywhere or ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        rows = await committed_and_end(bootstrap, f"{topics.prefix}-worker-{ACTIVITY}", topics.requests(ACTIVITY))
        behind = {p: last[p] + 1 - (rows[p][0] if rows[p][0] is not None else 0) for p in last}
        if all(b <= 0 for b in behind.values()) or time.monotonic() > deadline:
            return behind
        await asyncio.sleep(0.5)


async def _ready(bootstrap: str, topics: Topics) -> int:
    """A first transaction of requests answered: the worker has its partitions. Returns how many."""
    await topics_exist(bootstrap, [topics.requests(ACTIVITY), topics.completions])
    _, sent = await produce_requests(bootstrap, topics, 1, 1, 1, seed=1)
    got, _ = await answered(bootstrap, topics, sent, 120)
    assert got == sent, "the worker answered nothing within 120 s"
    return sent


async def test_committed_offsets_reach_the_last_answered_request(kafka_bootstrap, tmp_path):
    topics = Topics(f"wo{uuid.uuid4().hex[:10]}")
    worker = _worker("worker", _env(kafka_bootstrap, topics.prefix), tmp_path)
    try:
        first_sent = await _ready(kafka_bootstrap, topics)
        last, sent = await produce_requests(kafka_bootstrap, topics, 400, 3, PARTITIONS)
        got, _ = await answered(kafka_bootstrap, topics, sent + first_sent, 120)
        assert got == sent + first_sent
        # commits every 0.5 s: within a few seconds of the last answer every partition is committed past it (faust's
        # bookkeeping was 146-166 records behind after 5 s, on this same load)
        behind = await _behind(kafka_bootstrap, topics, last, within=5.0)
        assert all(b <= 0 for b in behind.values()), f"committed offsets behind the last answered request: {behind}"
    finally:
        worker.stop()


async def test_a_worker_commits_what_it_answered_when_it_loses_partitions_and_when_it_stops(kafka_bootstrap, tmp_path):
    """With periodic commits out of the way (every 600 s), only the commit on revocation and the one at SIGTERM can
    move the group's offsets."""
    topics = Topics(f"wo{uuid.uuid4().hex[:10]}")
    env = _env(kafka_bootstrap, topics.prefix, LEGATO_COMMIT_INTERVAL="600")
    first = _worker("first", env, tmp_path)
    second = None
    try:
        first_sent = await _ready(kafka_bootstrap, topics)
        last, sent = await produce_requests(kafka_bootstrap, topics, 100, 3, PARTITIONS, seed=11)
        got, _ = await answered(kafka_bootstrap, topics, sent + first_sent, 120)
        assert got == sent + first_sent
        second = _worker("second", env, tmp_path)  # the group rebalances: the first worker's partitions are revoked
        behind = await _behind(kafka_bootstrap, topics, last, within=60.0)
        assert all(b <= 0 for b in behind.values()), f"not committed on revocation: {behind}"

        more, sent2 = await produce_requests(kafka_bootstrap, topics, 100, 3, PARTITIONS, seed=12)
        got, total = await answered(kafka_bootstrap, topics, sent + sent2 + first_sent, 120)
        assert got == sent + sent2 + first_sent
        assert total == got, f"{total - got} requests executed twice"
        for proc in (first, second):
            proc.proc.send_signal(signal.SIGTERM)
        for proc in (first, second):
            await asyncio.to_thread(proc.proc.wait, 30)
        behind = await _behind(kafka_bootstrap, topics, {**last, **more}, within=5.0)
        assert all(b <= 0 for b in behind.values()), f"not committed at SIGTERM: {behind}"
    finally:
        first.stop()
        if second is not None:
            second.stop()
