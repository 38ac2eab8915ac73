"""The result cache is served by the coordinator, for every worker: an independent worker (plain aiokafka, nothing
of Legato, knows nothing of the cache) answers a `cache: {ttl: 1h}` step once; an identical run later completes
with the step `cached` without the request reaching the worker, also after the coordinator was SIGKILLed and
another coordinator process started in its place (the store is the compacted cache topic, not a process).

Own topic prefix and processes: a `legato coordinator` subprocess (no Legato worker at all) and the test's worker.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import urllib.request
import uuid
from collections import Counter

import orjson
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from legato.topics.cache import fingerprint
from legato.topics.client import LegatoClient
from legato.topics.models import ActivityCompleted
from tests.integration.conftest import Legato, _start

pytestmark = pytest.mark.integration

ACTIVITY = "external_cached"
WORKFLOW = f"""\
name: cache_external
timeout: 90s
steps:
  - id: shout
    activity: {ACTIVITY}
    input: {{text: "${{ input.text }}"}}
    cache: {{ttl: 1h}}
    timeout: 60s
output: "{{'text': steps.shout.output.text, 'cached': steps.shout.cached}}"
"""
FIRST_RUN_TIMEOUT_S = 180.0  # a fresh prefix: the coordinator creates its topics and joins its group first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _counter(port: int, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and 'workflow="cache_external"' in line and 'step="shout"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


class IndependentWorker:
    """A worker for ACTIVITY written against the topic contract only: consume requests, produce completions."""

    def __init__(self, bootstrap: str, prefix: str):
        self.bootstrap, self.prefix = bootstrap, prefix
        self.seen: Counter[str] = Counter()  # requests by input text
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(f"{self.prefix}.requests.{ACTIVITY}", bootstrap_servers=self.bootstrap, group_id=f"{self.prefix}-independent",
                                    isolation_level="read_committed", auto_offset_reset="earliest", enable_auto_commit=True)
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=0)
        await consumer.start()
        await producer.start()
        self._task = asyncio.create_task(self._serve(consumer, producer))

    async def _serve(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        try:
            async for msg in consumer:
                request = orjson.loads(msg.value)
                text = request["input"]["text"]
                self.seen[text] += 1
                completion = {"request_id": request["request_id"], "run_id": request["run_id"], "step_id": request["step_id"],
                              "attempt": request["attempt"], "status": "succeeded", "output": {"text": text.upper()}, "confidence": 0.9}
                await producer.send_and_wait(f"{self.prefix}.completions", orjson.dumps(completion), key=request["run_id"].encode())
        finally:
            await consumer.stop()
            await producer.stop()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cache_system(kafka_bootstrap, tmp_path_factory):
    prefix = f"ca{uuid.uuid4().hex[:12]}"
    workdir = tmp_path_factory.mktemp("legato-cache")
    (workdir / "workflows").mkdir()
    (workdir / "workflows" / "cache_external.yaml").write_text(WORKFLOW, encoding="utf-8")
    env = {**os.environ, "LEGATO_BOOTSTRAP": kafka_bootstrap, "LEGATO_TOPIC_PREFIX": prefix, "LEGATO_WORKFLOWS": str(workdir / "workflows"),
           "LEGATO_LOGLEVEL": "info", "LEGATO_SESSION_TIMEOUT": "6", "PYTHONUNBUFFERED": "1"}
    env.pop("LEGATO_HANDLERS", None)
    harness = Legato(kafka_bootstrap, prefix, env, workdir)
    worker = IndependentWorker(kafka_bootstrap, prefix)
    try:
        harness.client = LegatoClient(kafka_bootstrap, prefix)
        await harness.client.__aenter__()
        yield harness, worker
    finally:
        await worker.stop()
        if harness.client is not None:
            await harness.client.__aexit__(None, None, None)
        for s in harness.services:
            s.stop()


def start_coordinator(harness: Legato, name: str) -> int:
    """A `legato coordinator` process with its own data directory and metrics port; returns the port."""
    port = _free_port()
    data = harness.workdir / f"data-{name}"
    data.mkdir()
    harness.services.append(_start(name, ["coordinator"], {**harness.env, "LEGATO_DATA_DIR": str(data), "LEGATO_METRICS_PORT": str(port)},
                                   harness.workdir))
    return port


async def cached_completions(harness: Legato, run_id: str) -> list[bool | None]:
    return [c.cached for c in await harness.records_of(harness.topics.completions, ActivityCompleted, run_id)]


async def test_an_independent_workers_result_is_a_hit_for_every_coordinator(cache_system):
    harness, worker = cache_system
    first_port = start_coordinator(harness, "coordinator-1")
    hello = {"text": f"hello {uuid.uuid4().hex[:6]}"}

    # 1. A miss: the request reaches the independent worker, whose plain completion the coordinator stores.
    await worker.start()  # the test broker auto-creates the request topic, with the run-keyed partition count
    first_run = await harness.trigger("cache_external", hello)
    first = (await harness.wait_for({first_run}, timeout=FIRST_RUN_TIMEOUT_S))[first_run]
    assert first.status == "succeeded", first
    assert first.output == {"text": hello["text"].upper(), "cached": False}
    key = fingerprint(ACTIVITY, hello).encode()
    [entry] = [r for r in await harness.read_topic(harness.topics.cache, until=lambda rs: any(r.key == key for r in rs), timeout=30) if r.key == key]
    stored = orjson.loads(entry.value)
    assert set(stored) == {"output", "confidence", "stored_ms"}, "the contract's record shape"
    assert stored["output"] == {"text": hello["text"].upper()} and stored["confidence"] == 0.9
    await asyncio.sleep(1.0)  # the coordinator's table follows the topic (polls of 200 ms)

    # 2. The identical request within the ttl: answered by the coordinator, the worker never sees it.
    second = await harness.run("cache_external", hello, timeout=60)
    assert second.status == "succeeded", second
    assert second.output == {"text": hello["text"].upper(), "cached": True}
    assert await cached_completions(harness, second.run_id) == [True], "one cached completion, in the log like any other"
    assert worker.seen[hello["text"]] == 1, worker.seen

    # 3. Another input is a miss, and reaches the worker.
    other = await harness.run("cache_external", {"text": "other"}, timeout=60)
    assert other.output == {"text": "OTHER", "cached": False}
    assert worker.seen["other"] == 1
    assert _counter(first_port, "legato_cache_hits_total") == 1
    assert _counter(first_port, "legato_cache_misses_total") == 2

    # 4. The coordinator is killed; another process takes over with nothing but the log: still a hit.
    killed = harness.services.pop()
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(10)
    second_port = start_coordinator(harness, "coordinator-2")
    third = await harness.run("cache_external", hello, timeout=FIRST_RUN_TIMEOUT_S)
    assert third.status == "succeeded", third
    assert third.output == {"text": hello["text"].upper(), "cached": True}
    assert worker.seen[hello["text"]] == 1, "the request never reached a worker again"
    assert _counter(second_port, "legato_cache_hits_total") == 1
    for run_id in (first_run, second.run_id, other.run_id, third.run_id):
        await harness.assert_single_terminal(run_id)
