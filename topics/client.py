"""A small async client for services: trigger runs, wait for their terminal events, subscribe to a workflow, signal
runs and stream their progress.

Needs nothing but aiokafka and the topic contract; any other language can do the same with its own client.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator, Callable

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import TopicAuthorizationFailedError

from legato.topics import kafka_io

from legato.topics import codec
from legato.topics.codec import DecodeError
from legato.topics.models import ProgressReported, RunCancelRequested, RunEvent, RunForkRequested, RunRedriveRequested, RunRequested, SignalSent
from legato.topics.names import DEFAULT_PREFIX, Topics
from legato.topics.payloads import DEFAULT_INLINE_MAX, KafkaPayloadStore, Payloads, PayloadStore

TERMINAL_TYPES = ("run.completed", "run.failed", "run.cancelled")


class LegatoClient:
    """``async with LegatoClient(bootstrap) as c: event = await c.run("wf", {...})``."""

    def __init__(self, bootstrap: str = "localhost:9092", prefix: str = DEFAULT_PREFIX, *, payload_inline_max: int = DEFAULT_INLINE_MAX,
                 payload_store: PayloadStore | None = None, **kafka: object):
        """``payload_inline_max``, ``payload_store``: an input or signal data whose JSON is larger is stored there (by
        default on ``<prefix>.payloads``) and sent as a reference (docs/payloads.md)."""
        self.bootstrap = bootstrap
        self.topics = Topics(prefix)
        self._kafka = kafka
        self._producer: AIOKafkaProducer | None = None
        self.payloads = Payloads(payload_store or KafkaPayloadStore(bootstrap, self.topics.payloads, **kafka), payload_inline_max)

    async def __aenter__(self) -> "LegatoClient":
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=0, partitioner=kafka_io.keyed_partitioner, **self._kafka)
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._producer is not None:
            await self._producer.stop()
        await self.payloads.stop()

    async def fetch(self, value: Any) -> Any:
        """``value`` (a run's output, a step's output, a progress chunk) with every payload reference in it replaced by
        the value it points at (sha256 checked)."""
        return await self.payloads.resolve(value)

    async def trigger(self, workflow: str, input: dict | None = None, *, run_id: str | None = None, correlation_id: str | None = None,
                      version: int | None = None, priority: int | None = None) -> str:
        """Publish a trigger and return its run_id (a new uuid4 unless given; it is the idempotency key). The run is
        pinned to ``version`` of the workflow, or to its highest version deployed when the coordinator decides it.
        ``priority`` (1 lowest to 5; default 3) orders the run's steps among those waiting for a saturated limit
        (docs/limits.md); ``ValueError`` outside 1–5."""
        assert self._producer is not None, "use `async with LegatoClient(...)`"
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= 5):
            raise ValueError(f"priority {priority!r}: expected an integer from 1 (lowest) to 5")
        run_id = run_id or str(uuid.uuid4())
        input = await self.payloads.externalize(run_id, input or {})  # a reference is an object too: the run sees the value
        record = RunRequested(workflow=workflow, input=input, run_id=run_id, correlation_id=correlation_id, version=version, priority=priority)
        await self._producer.send_and_wait(self.topics.triggers, codec.dumps(record), key=run_id.encode())
        return run_id

    async def cancel(self, run_id: str, reason: str = "") -> None:
        """Ask the coordinator to cancel a run: it cancels the run's pending requests and child runs and ends it
        with one ``run.cancelled`` event. A run that is unknown or already finished is left as it is."""
        assert self._producer is not None, "use `async with LegatoClient(...)`"
        record = RunCancelRequested(run_id=run_id, reason=reason)
        await self._producer.send_and_wait(self.topics.coordinator, codec.dumps(record), key=run_id.encode())

    async def signal(self, run_id: str, signal: str, data: Any = None, signal_id: str | None = None) -> None:
        """Send ``signal`` (with ``data``, any JSON value) to a run: it completes the run's oldest ``wait`` step on
        that name, or is kept until one starts. A repeated ``signal_id`` for the same run is ignored."""
        assert self._producer is not None, "use `async with LegatoClient(...)`"
        record = SignalSent(run_id=run_id, signal=signal, data=await self.payloads.externalize(run_id, data), signal_id=signal_id)
        await self._producer.send_and_wait(self.topics.signals, codec.dumps(record), key=run_id.encode())

    async def stream(self, run_id: str, *, from_beginning: bool = True, timeout: float | None = None) -> AsyncIterator[ProgressReported | RunEvent]:
        """The run's progress chunks in order, then its terminal event, where the iteration ends.

        Reads the run's partition of ``legato.progress`` and ``legato.runs``: from their beginning by default (every
        chunk so far, then the rest as they come), or with ``from_beginning=False`` only what is produced from now
        on. Chunks a redelivered request reports again are dropped (same request_id and seq).
        ``asyncio.TimeoutError`` when no terminal event comes within ``timeout`` seconds."""
        consumer = kafka_io.reader(self.bootstrap, from_beginning=from_beginning, **self._kafka)
        await consumer.start()
        try:
            partitions = await kafka_io.partitions_of(consumer, self.topics.progress, wait=5.0)
            if not partitions:
                raise RuntimeError(f"topic {self.topics.progress} does not exist: is a coordinator running?")
            p = kafka_io.partition_for(run_id.encode(), len(partitions))
            progress, runs = TopicPartition(self.topics.progress, p), TopicPartition(self.topics.runs, p)
            await kafka_io.assign(consumer, [progress, runs], from_beginning=from_beginning)
            deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
            chunks = _Chunks(run_id)
            while True:
                if deadline is not None and asyncio.get_running_loop().time() > deadline:
                    raise asyncio.TimeoutError(f"no terminal event for run {run_id} within {timeout}s")
                polled = await consumer.getmany(timeout_ms=200)
                for record in polled.get(progress, []):
                    for chunk in chunks.of(record):
                        yield chunk
                for record in polled.get(runs, []):
                    event = _terminal_of(record, run_id)
                    if event is not None:
                        # the worker delivered every chunk before the completion that led here: read up to the end
                        async for chunk in _rest_of(consumer, progress, chunks):
                            yield chunk
                        yield event
                        return
        finally:
            await consumer.stop()

    async def redrive(self, run_id: str, reason: str = "") -> None:
        """Ask the coordinator to resume a failed run from what failed, keeping the outputs of the steps that
        succeeded. A run that is not failed (or unknown, or forgotten after its retention) is left as it is."""
        assert self._producer is not None, "use `async with LegatoClient(...)`"
        record = RunRedriveRequested(run_id=run_id, reason=reason)
        await self._producer.send_and_wait(self.topics.coordinator, codec.dumps(record), key=run_id.encode())

    async def fork(self, run_id: str, from_step: str, input: dict | None = None, *, new_run_id: str | None = None, reason: str = "") -> str:
        """Start a new run of ``run_id``'s definition that reuses the outputs of the steps before ``from_step`` and
        runs from it on (with ``input`` instead of the source's when given); return the new run's id."""
        assert self._producer is not None, "use `async with LegatoClient(...)`"
        new_run_id = new_run_id or str(uuid.uuid4())
        record = RunForkRequested(run_id=run_id, from_step=from_step, new_run_id=new_run_id, input=input, reason=reason)
        await self._producer.send_and_wait(self.topics.coordinator, codec.dumps(record), key=run_id.encode())
        return new_run_id

    async def redriven(self, run_id: str, reason: str = "", *, timeout: float = 300.0, progress: Callable[[str], None] | None = None) -> RunEvent:
        """Redrive a run and wait for its next terminal event."""
        async with _RunsConsumer(self.bootstrap, [self.topics.runs], False, self._kafka) as consumer:
            started = asyncio.get_running_loop().time()
            await self.redrive(run_id, reason)
            return await asyncio.wait_for(self._wait(consumer, {run_id}, progress, started), timeout)

    async def forked(self, run_id: str, from_step: str, input: dict | None = None, *, new_run_id: str | None = None, reason: str = "",
                     timeout: float = 300.0, progress: Callable[[str], None] | None = None) -> RunEvent:
        """Fork a run and wait for the new run's terminal event."""
        new_run_id = new_run_id or str(uuid.uuid4())
        async with _RunsConsumer(self.bootstrap, [self.topics.runs], False, self._kafka) as consumer:
            started = asyncio.get_running_loop().time()
            await self.fork(run_id, from_step, input, new_run_id=new_run_id, reason=reason)
            if progress:
                progress(f"forked run {run_id} from step {from_step} as {new_run_id}")
            return await asyncio.wait_for(self._wait(consumer, {new_run_id}, progress, started), timeout)

    async def run(self, workflow: str, input: dict | None = None, *, run_id: str | None = None, timeout: float = 300.0,
                  progress: Callable[[str], None] | None = None, version: int | None = None, priority: int | None = None) -> RunEvent:
        """Trigger a run (``priority`` as in :meth:`trigger`) and wait for its terminal event."""
        run_id = run_id or str(uuid.uuid4())
        watch = [self.topics.runs, self.topics.completions, self.topics.progress] if progress else [self.topics.runs]
        async with _RunsConsumer(self.bootstrap, watch, False, self._kafka) as consumer:
            started = asyncio.get_running_loop().time()
            await self.trigger(workflow, input, run_id=run_id, version=version, priority=priority)
            if progress:
                progress(f"triggered {workflow} run {run_id}")
            return await asyncio.wait_for(self._wait(consumer, {run_id}, progress, started), timeout)

    async def wait_for(self, run_ids: set[str], timeout: float = 300.0, from_beginning: bool = True) -> dict[str, RunEvent]:
        """Terminal events of ``run_ids`` (read from the start of legato.runs by default)."""
        results: dict[str, RunEvent] = {}
        async with self._runs_consumer(from_beginning) as consumer:
            async def collect() -> None:
                async for event in self._events(consumer):
                    if event.run_id in run_ids and event.type in TERMINAL_TYPES:
                        results.setdefault(event.run_id, event)
                        if len(results) == len(run_ids):
                            return
            await asyncio.wait_for(collect(), timeout)
        return results

    async def subscribe(self, workflow: str | None = None, from_beginning: bool = False) -> AsyncIterator[RunEvent]:
        """Terminal events of every run (of ``workflow`` when given), as they happen."""
        async with self._runs_consumer(from_beginning) as consumer:
            async for event in self._events(consumer):
                if event.type in TERMINAL_TYPES and (workflow is None or event.workflow == workflow):
                    yield event

    async def _wait(self, consumer: AIOKafkaConsumer, run_ids: set[str], progress: Callable[[str], None] | None, started: float = 0.0) -> RunEvent:
        loop = asyncio.get_running_loop()
        chunks = {run_id: _Chunks(run_id) for run_id in run_ids}

        def show(chunk: ProgressReported) -> None:
            assert progress is not None
            progress(f"{loop.time() - started:7.3f}s  step {chunk.step_id} #{chunk.seq}: {orjson.dumps(chunk.chunk).decode()}")

        async for msg in consumer:
            if msg.topic == self.topics.progress:
                for run_id in run_ids:
                    for chunk in chunks[run_id].of(msg):
                        show(chunk)
                continue
            try:
                raw = codec.decode_object(msg.value)
            except DecodeError:
                continue
            if raw.get("run_id") not in run_ids:
                continue
            if msg.topic == self.topics.completions:
                if progress:  # live progress: every completion of the run, read from the contract's topic
                    error = raw.get("error") or {}
                    detail = f" ({error.get('type')}: {error.get('message')})" if error else ""
                    progress(f"{loop.time() - started:7.3f}s  step {raw.get('step_id')} attempt {raw.get('attempt')} {raw.get('status')}{detail}")
                continue
            try:
                event = codec.validate(RunEvent, raw)
            except DecodeError:
                continue
            if progress and event.type in TERMINAL_TYPES:
                tp = TopicPartition(self.topics.progress, msg.partition)  # co-partitioned with the runs topic
                if tp in consumer.assignment():
                    async for chunk in _rest_of(consumer, tp, chunks[event.run_id]):
                        show(chunk)
            if progress:
                progress(f"{loop.time() - started:7.3f}s  {event.type}")
            if event.type in TERMINAL_TYPES:
                return event
        raise RuntimeError("the runs topic ended")

    async def _events(self, consumer: AIOKafkaConsumer) -> AsyncIterator[RunEvent]:
        async for msg in consumer:
            try:
                yield codec.decode(RunEvent, msg.value)
            except DecodeError:
                continue

    def _runs_consumer(self, from_beginning: bool = False) -> "_RunsConsumer":
        return _RunsConsumer(self.bootstrap, [self.topics.runs], from_beginning, self._kafka)


class _RunsConsumer:
    """A group-less consumer of every partition of the given topics, positioned before anything is triggered."""

    def __init__(self, bootstrap: str, topics: list[str], from_beginning: bool, kafka: dict):
        self.consumer = kafka_io.reader(bootstrap, from_beginning=from_beginning, **kafka)
        self.topics = topics
        self.from_beginning = from_beginning

    async def __aenter__(self) -> AIOKafkaConsumer:
        await self.consumer.start()
        try:
            for topic in self.topics:  # a refusal is an error now, not "does not exist" later
                if not await kafka_io.partitions_of(self.consumer, topic) and await kafka_io.refused(self.consumer, topic):
                    raise TopicAuthorizationFailedError(f"not authorized to read {topic} (the principal's role lacks it: legato acl)")
            await kafka_io.assign_all(self.consumer, self.topics, from_beginning=self.from_beginning, missing=_missing)
        except BaseException:
            await self.consumer.stop()
            raise
        return self.consumer

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()


def _missing(topic: str) -> None:
    raise RuntimeError(f"topic {topic} does not exist: is a coordinator running?")


class _Chunks:
    """The progress chunks of one run, each (request_id, seq) once."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._seen: set[tuple[str, int]] = set()

    def of(self, record: Any) -> list[ProgressReported]:
        try:
            chunk = codec.decode(ProgressReported, record.value)
        except DecodeError:
            return []
        if chunk.run_id != self.run_id or (chunk.request_id, chunk.seq) in self._seen:
            return []
        self._seen.add((chunk.request_id, chunk.seq))
        return [chunk]


def _terminal_of(record: Any, run_id: str) -> RunEvent | None:
    try:
        event = codec.decode(RunEvent, record.value)
    except DecodeError:
        return None
    return event if event.run_id == run_id and event.type in TERMINAL_TYPES else None


async def _rest_of(consumer: AIOKafkaConsumer, tp: TopicPartition, chunks: _Chunks) -> AsyncIterator[ProgressReported]:
    """The chunks left on ``tp`` up to its end offset now (``consumer`` fetches several topics in no set order)."""
    end = (await consumer.end_offsets([tp]))[tp]
    while await consumer.position(tp) < end:
        for record in (await consumer.getmany(tp, timeout_ms=200)).get(tp, []):
            for chunk in chunks.of(record):
                yield chunk
