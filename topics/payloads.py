"""Claim checks: payloads over ``LEGATO_PAYLOAD_INLINE_MAX`` travel as references to a payload store.

A reference is one JSON object, wherever a value may be (a trigger's input, an activity's output, a signal's data,
a progress chunk, or any value inside them)::

    {"$ref": "legato-payload:<id>", "size": <bytes of the value's JSON>, "sha256": "<hex of those bytes>",
     "chunks": <records>, "partition": <p>, "offset": <first record>}

``chunks``, ``partition`` and ``offset`` are where the Kafka store put it (absent for a file store); ``sha256`` is
checked on every read. The schema is ``topics/schemas/payload_ref.json``.

Stores (:class:`PayloadStore`: put, get, delete by payload id):

- :class:`KafkaPayloadStore`: the compacted topic ``<prefix>.payloads``, the value's JSON cut into records of
  ``CHUNK_BYTES`` keyed ``<id>/<n>``, all on one partition; a reference names the partition and the first offset,
  so a read seeks there. Deleting writes a tombstone per chunk.
- :class:`FilePayloadStore`: one file per payload under a directory (``LEGATO_PAYLOAD_STORE=file:///path``), for a
  directory every process mounts.

An object store is a third implementation of the same three methods (``put`` returns no location: the id is the
object's name). Payload ids are ``<scope>/<sha256>``: the run's id, then the value's hash, so the same value stored
twice for a run (a retried attempt) is one payload, and a run's retention deletes its payloads and no other run's.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Protocol
from urllib.parse import quote, unquote, urlparse

import orjson

from legato.topics.payload_refs import REF_PREFIX, PayloadRef, is_ref, may_hold_refs, refs_in, substitute  # noqa: F401 (re-exported)

DEFAULT_INLINE_MAX = 262_144
"""Bytes of a value's JSON above which it is stored by reference (``LEGATO_PAYLOAD_INLINE_MAX``)."""
CHUNK_BYTES = 900_000
"""Bytes per record of the Kafka store: under the broker's 1 MiB record limit with the key and framing."""
MAX_PAYLOAD_BYTES = 2 * 1024**3
"""The largest value a store takes (2 GiB): a sanity bound, not a tuning knob."""


class PayloadError(RuntimeError):
    """A payload that cannot be stored or read: missing (deleted by retention?), corrupted, or a bad reference."""


def encoded(value: Any) -> bytes:
    return orjson.dumps(value)


def payload_id(scope: str, data: bytes) -> str:
    return f"{scope}/{hashlib.sha256(data).hexdigest()}"


def decode_payload(ref: PayloadRef, data: bytes) -> Any:
    """The value of ``data`` read for ``ref``, after checking its size and sha256."""
    if len(data) != ref.size:
        raise PayloadError(f"payload {ref.id}: read {len(data)} bytes, the reference says {ref.size}")
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise PayloadError(f"payload {ref.id}: sha256 mismatch (corrupted or overwritten)")
    return orjson.loads(data)


def _ref_bytes(scope: str) -> int:
    """An upper bound of a reference's JSON for a payload of ``scope`` (size, sha256, chunks, partition, offset)."""
    return 260 + len(scope.encode())


class PayloadStore(Protocol):
    """Where payloads live. ``put`` returns the location fields a reference carries (may be empty)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def put(self, payload_id: str, data: bytes) -> dict[str, int]: ...

    async def get(self, ref: PayloadRef) -> bytes: ...

    async def delete(self, ref: PayloadRef) -> None: ...


Counter = Callable[[str, int], None]
"""``count(direction, bytes)``: direction is ``stored`` or ``fetched`` (metrics)."""


class Payloads:
    """Stores values over ``inline_max`` and resolves references, through one store; what Legato's processes use.

    ``count`` is told the bytes stored and fetched (Prometheus counters in ``legato.streams.metrics``)."""

    def __init__(self, store: PayloadStore, inline_max: int = DEFAULT_INLINE_MAX, count: Counter | None = None,
                 max_bytes: int = MAX_PAYLOAD_BYTES):
        self.store = store
        self.inline_max = inline_max
        self.count = count
        self.max_bytes = max_bytes

    async def start(self) -> None:
        await self.store.start()

    async def stop(self) -> None:
        await self.store.stop()

    async def put(self, scope: str, value: Any, data: bytes | None = None) -> dict[str, Any]:
        """Store ``value`` (whatever its size) and return its reference, as it travels."""
        data = encoded(value) if data is None else data
        if len(data) > self.max_bytes:
            raise PayloadError(f"a payload of {len(data):,} bytes is over the limit of {self.max_bytes:,}")
        pid = payload_id(scope, data)
        location = await self.store.put(pid, data)
        if self.count is not None:
            self.count("stored", len(data))
        return PayloadRef.model_validate({"$ref": REF_PREFIX + pid, "size": len(data), "sha256": pid.rsplit("/", 1)[1], **location}).wire()

    async def externalize(self, scope: str, value: Any) -> Any:
        """``value`` itself when its JSON is at most ``inline_max`` bytes, else with its large parts stored: each
        field or item over the limit becomes a reference (recursively); when what is left is still over the limit (many
        small parts), the whole value is stored instead, so a stored value never holds references of its own.
        ``{"text": <20 MB>, "lang": "en"}`` travels as ``{"text": <reference>, "lang": "en"}``: an expression reads
        ``lang`` without a fetch and ``text`` goes on to the next step as its reference."""
        if value is None or isinstance(value, (bool, int, float)):
            return value
        data = encoded(value)
        if len(data) <= self.inline_max:
            return value
        return await self._store(scope, value, data)

    async def _store(self, scope: str, value: Any, data: bytes) -> Any:
        """``value`` (over the limit) split into references when ``_split_size`` says it then fits, else stored whole."""
        if self._split_size(scope, value, data) is None:
            return await self.put(scope, value, data)
        if isinstance(value, dict):
            return {k: await self._store(scope, v, encoded(v)) if self._over(v) else v for k, v in value.items()}
        return [await self._store(scope, v, encoded(v)) if self._over(v) else v for v in value]

    def _split_size(self, scope: str, value: Any, data: bytes) -> int | None:
        """The bytes of ``value``'s JSON once its parts over the limit are references (or split in turn), when that
        fits under the limit; None when it does not (the value is stored whole: nothing of it stored on its own)."""
        if isinstance(value, dict) and not is_ref(value):
            children = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            return None
        size, split = len(data), False
        for child in children:
            if self._over(child):
                child_data = encoded(child)
                size += (self._split_size(scope, child, child_data) or _ref_bytes(scope)) - len(child_data)
                split = True
        return size if split and size <= self.inline_max else None

    def _over(self, value: Any) -> bool:
        return not (value is None or isinstance(value, (bool, int, float))) and len(encoded(value)) > self.inline_max

    async def fetch(self, ref: PayloadRef | dict[str, Any]) -> Any:
        """The value ``ref`` points at (its sha256 checked)."""
        ref = ref if isinstance(ref, PayloadRef) else PayloadRef.model_validate(ref)
        data = await self.store.get(ref)
        if self.count is not None:
            self.count("fetched", len(data))
        return decode_payload(ref, data)

    async def resolve(self, value: Any) -> Any:
        """``value`` with every reference inside replaced by its value, also those inside fetched values (a value that
        holds none is returned as is)."""
        while True:
            refs = refs_in(value)
            if not refs:
                return value
            values = {ref.id: await self.fetch(ref) for ref in refs}
            value = substitute(value, values)

    async def delete(self, ref: PayloadRef | dict[str, Any]) -> None:
        await self.store.delete(ref if isinstance(ref, PayloadRef) else PayloadRef.model_validate(ref))


# --- the file store ------------------------------------------------------------------------------


class FilePayloadStore:
    """One file per payload under ``root`` (created when missing): ``<root>/<id with / and other marks quoted>``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    async def stop(self) -> None:
        return None

    def _path(self, payload_id: str) -> Path:
        return self.root / quote(payload_id, safe="")

    async def put(self, payload_id: str, data: bytes) -> dict[str, int]:
        await asyncio.to_thread(self._write, self._path(payload_id), data)
        return {}

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers see the whole file or none

    async def get(self, ref: PayloadRef) -> bytes:
        try:
            return await asyncio.to_thread(self._path(ref.id).read_bytes)
        except FileNotFoundError:
            raise PayloadError(f"payload {ref.id} not found in {self.root} (deleted by its run's retention?)") from None

    async def delete(self, ref: PayloadRef) -> None:
        try:
            await asyncio.to_thread(self._path(ref.id).unlink)
        except FileNotFoundError:
            pass

    def ids(self) -> list[str]:
        """Every payload id stored (for tests and measurements)."""
        return sorted(unquote(p.name) for p in self.root.iterdir() if not p.name.startswith("."))


# --- the Kafka store -----------------------------------------------------------------------------


def chunk_key(payload_id: str, n: int) -> bytes:
    return f"{payload_id}/{n}".encode()


def chunks_of(data: bytes, size: int = CHUNK_BYTES) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


class KafkaPayloadStore:
    """Payloads on the compacted topic ``topic`` (``<prefix>.payloads``), created by the coordinator.

    Every chunk of a payload goes to the partition of its id (murmur2), so a reference's ``partition`` and
    ``offset`` are where a reader seeks; it reads forward from there until it has every chunk (records of other
    payloads written in between are skipped)."""

    def __init__(self, bootstrap: str, topic: str, chunk_bytes: int = CHUNK_BYTES, **kafka: Any):
        self.bootstrap = bootstrap
        self.topic = topic
        self.chunk_bytes = chunk_bytes
        self.kafka = kafka
        self._producer: Any = None
        self._consumer: Any = None
        self._partitions: int | None = None
        self._read = asyncio.Lock()
        self._starting = asyncio.Lock()

    async def start(self) -> None:
        async with self._starting:  # concurrent first calls (a coordinator's partitions) start the clients once
            if self._consumer is None:
                await self._start_clients()

    async def _start_clients(self) -> None:
        from aiokafka import AIOKafkaProducer

        from legato.topics import kafka_io

        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                                    max_request_size=self.chunk_bytes + 64 * 1024, **self.kafka)
        await producer.start()
        consumer = kafka_io.reader(self.bootstrap, max_partition_fetch_bytes=2 * self.chunk_bytes, fetch_max_bytes=8 * self.chunk_bytes, **self.kafka)
        try:
            await consumer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer, self._consumer = producer, consumer

    async def stop(self) -> None:
        for client in (self._producer, self._consumer):
            if client is not None:
                await client.stop()
        self._producer = self._consumer = None

    async def _partition_count(self) -> int:
        from legato.topics import kafka_io

        if self._partitions is None:
            partitions = await kafka_io.partitions_of(self._consumer, self.topic, wait=10.0)
            if not partitions:
                raise PayloadError(f"topic {self.topic} does not exist: is a coordinator running?")
            self._partitions = len(partitions)
        return self._partitions

    async def put(self, payload_id: str, data: bytes) -> dict[str, int]:
        from legato.topics import kafka_io

        await self.start()
        partition = kafka_io.partition_for(payload_id.encode(), await self._partition_count())
        pieces = chunks_of(data, self.chunk_bytes)
        futures = [await self._producer.send(self.topic, piece, key=chunk_key(payload_id, n), partition=partition) for n, piece in enumerate(pieces)]
        first = await futures[0]
        for fut in futures[1:]:
            await fut
        return {"chunks": len(pieces), "partition": partition, "offset": first.offset}

    async def get(self, ref: PayloadRef) -> bytes:
        from aiokafka import TopicPartition

        if ref.partition is None or ref.offset is None or ref.chunks is None:
            raise PayloadError(f"payload {ref.id}: the reference has no partition, offset and chunks (not written by a Kafka store)")
        await self.start()
        tp = TopicPartition(self.topic, ref.partition)
        wanted = {chunk_key(ref.id, n): n for n in range(ref.chunks)}
        pieces: dict[int, bytes] = {}
        async with self._read:
            self._consumer.assign([tp])
            end = (await self._consumer.end_offsets([tp]))[tp]
            self._consumer.seek(tp, ref.offset)
            while len(pieces) < ref.chunks:
                if await self._consumer.position(tp) >= end:
                    break
                for records in (await self._consumer.getmany(tp, timeout_ms=1000)).values():
                    for record in records:
                        n = wanted.get(record.key)
                        if n is None:
                            continue
                        if record.value is None:
                            pieces.pop(n, None)  # a tombstone: deleted by retention
                        else:
                            pieces[n] = record.value
        if len(pieces) < ref.chunks:
            raise PayloadError(f"payload {ref.id}: {len(pieces)} of {ref.chunks} chunks found on {self.topic}[{ref.partition}] "
                               f"from offset {ref.offset} (deleted by its run's retention?)")
        return b"".join(pieces[n] for n in range(ref.chunks))

    async def delete(self, ref: PayloadRef) -> None:
        from legato.topics import kafka_io

        await self.start()
        chunks = ref.chunks or 1
        partition = ref.partition if ref.partition is not None else kafka_io.partition_for(ref.id.encode(), await self._partition_count())
        futures = [await self._producer.send(self.topic, None, key=chunk_key(ref.id, n), partition=partition) for n in range(chunks)]
        for fut in futures:
            await fut


def store_from_url(url: str | None, bootstrap: str, topic: str, **kafka: Any) -> PayloadStore | None:
    """The store ``LEGATO_PAYLOAD_STORE`` names: ``kafka`` (or empty: the topic), ``file:///path``, or ``none`` (no
    claim checks: a value past a record's limit fails where it is produced)."""
    if url == "none":
        return None
    if not url or url == "kafka":
        return KafkaPayloadStore(bootstrap, topic, **kafka)
    parsed = urlparse(url)
    if parsed.scheme == "file" and parsed.path:
        return FilePayloadStore(unquote(parsed.path))
    raise ValueError(f"LEGATO_PAYLOAD_STORE={url!r}: expected kafka, file:///path or none")


# --- for workers of their own (confluent-kafka) --------------------------------------------------


def fetch_with_confluent(ref: dict[str, Any], conf: dict[str, Any], topic: str = "legato.payloads", timeout: float = 30.0) -> Any:
    """The value of a Kafka-stored reference, read with confluent-kafka (``conf``: at least ``bootstrap.servers``);
    sha256 checked. For independent workers in Python; any client does the same: seek ``partition`` to ``offset``,
    read until the records keyed ``<id>/0`` … ``<id>/<chunks - 1>`` are all found, join their values."""
    import time

    from confluent_kafka import Consumer, TopicPartition

    parsed = PayloadRef.model_validate(ref)
    if parsed.partition is None or parsed.offset is None or parsed.chunks is None:
        raise PayloadError(f"payload {parsed.id}: not a Kafka-stored reference")
    consumer = Consumer({"group.id": "legato-payload-reader", "enable.auto.commit": False, "isolation.level": "read_committed", **conf})
    wanted = {chunk_key(parsed.id, n): n for n in range(parsed.chunks)}
    pieces: dict[int, bytes] = {}
    try:
        consumer.assign([TopicPartition(topic, parsed.partition, parsed.offset)])
        deadline = time.monotonic() + timeout
        while len(pieces) < parsed.chunks and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            n = wanted.get(msg.key())
            if n is not None and msg.value() is not None:
                pieces[n] = msg.value()
    finally:
        consumer.close()
    if len(pieces) < parsed.chunks:
        raise PayloadError(f"payload {parsed.id}: {len(pieces)} of {parsed.chunks} chunks read within {timeout}s")
    return decode_payload(parsed, b"".join(pieces[n] for n in range(parsed.chunks)))


def store_with_confluent(producer: Any, run_id: str, value: Any, topic: str = "legato.payloads", partitions: int = 8,
                         chunk_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    """Store ``value`` for run ``run_id`` on the payloads topic with a confluent-kafka ``producer`` (``acks=all``) and
    return the reference to send in its place. ``partitions``: the topic's partition count (the payload's id picks
    one with murmur2, as Legato's store does; any partition would be read as well, the reference names it)."""
    from legato.topics import kafka_io

    data = encoded(value)
    pid = payload_id(run_id, data)
    partition = kafka_io.partition_for(pid.encode(), partitions)
    offsets: list[int] = []
    errors: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            offsets.append(msg.offset())

    pieces = chunks_of(data, chunk_bytes)
    for n, piece in enumerate(pieces):
        producer.produce(topic, value=piece, key=chunk_key(pid, n), partition=partition, on_delivery=delivered)
    producer.flush()
    if errors or len(offsets) != len(pieces):
        raise PayloadError(f"payload {pid}: not stored: {errors or 'undelivered chunks'}")
    return PayloadRef.model_validate({"$ref": REF_PREFIX + pid, "size": len(data), "sha256": pid.rsplit("/", 1)[1],
                                      "chunks": len(pieces), "partition": partition, "offset": min(offsets)}).wire()
