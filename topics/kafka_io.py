"""Reading and keying Legato's topics with aiokafka: what the contract's client needs, and every other reader.

- :func:`partition_for`, :func:`keyed_partitioner`: the partition of a key, murmur2 as aiokafka and the Java client
  do by default (every run-keyed record's producer uses them);
- :func:`reader`, :func:`assign_all`, :func:`assign`, :func:`read_partition`, :func:`read_range`,
  :func:`offsets_of`: read topics without a consumer group,
  committed records only (each process sees everything: tails, the client, the coordinator's changelog,
  ``legato runs show``);
- :func:`fresh_metadata`, :func:`partitions_of`, :func:`refused`: the cluster's metadata, a topic's partitions, and whether the broker refuses this principal a
  topic (ACLs).

``fresh_metadata`` and ``refused`` use aiokafka's private client (pyproject.toml bounds its version); the rest of
aiokafka's and faust's private API that Legato uses is in ``legato.streams.kafka_io``, which re-exports this module.
The contract (``legato.topics``) imports nothing from ``legato.streams``.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

CHECKED_VERSIONS = {"aiokafka": ((0, 11), (0, 15)), "faust-streaming": ((0, 15, 2), (0, 16))}
"""Per package, the range [lowest, above-highest) of versions whose private API below was checked (pyproject.toml
bounds the install the same way; tests/test_private_api.py fails when the installed version leaves the range)."""

PRIVATE_API = [
    # (package, class, attribute, where Legato uses it and why no public API serves)
    ("aiokafka", "aiokafka.AIOKafkaConsumer", "_client", "topics/kafka_io.py fresh_metadata, refused: a fresh metadata request (the public lookup uses stale metadata)"),
    ("aiokafka", "aiokafka.client.AIOKafkaClient", "fetch_all_metadata", "topics/kafka_io.py fresh_metadata: the metadata of every topic, asked now"),
    ("aiokafka", "aiokafka.client.AIOKafkaClient", "send", "topics/kafka_io.py refused: a per-topic MetadataRequest"),
    ("aiokafka", "aiokafka.client.AIOKafkaClient", "get_random_node", "topics/kafka_io.py refused: a broker to ask"),
    ("aiokafka", "aiokafka.AIOKafkaConsumer", "_subscription", "streams/kafka_io.py fetched_position: the position without a round trip"),
    ("aiokafka", "aiokafka.consumer.subscription_state.SubscriptionState", "is_assigned", "streams/kafka_io.py fetched_position"),
    ("aiokafka", "aiokafka.consumer.subscription_state.Assignment", "state_value", "streams/kafka_io.py fetched_position"),
    ("aiokafka", "aiokafka.consumer.subscription_state.TopicPartitionState", "has_valid_position", "streams/kafka_io.py fetched_position"),
    ("aiokafka", "aiokafka.AIOKafkaConsumer", "_coordinator", "streams/kafka_io.py group_membership, committed_offsets: member id, generation, committed offsets in one request"),
    ("aiokafka", "aiokafka.consumer.group_coordinator.GroupCoordinator", "fetch_committed_offsets", "streams/kafka_io.py committed_offsets"),
    ("aiokafka", "aiokafka.AIOKafkaConsumer", "_isolation_level", "streams/kafka_io.py faust_read_committed: read_committed on faust's consumer"),
    ("aiokafka", "aiokafka.admin.AIOKafkaAdminClient", "_send_request", "streams/kafka_io.py admin_request: CreateAcls (streams/acl.py), which the admin client lacks"),
    ("aiokafka", "aiokafka.producer.sender", "BACKOFF_OVERRIDE", "streams/kafka_io.py transaction_retry_backoff: the CONCURRENT_TRANSACTIONS retry backoff"),
    ("faust-streaming", "faust.transport.drivers.aiokafka.Consumer", "_commit", "streams/kafka_io.py faust_commit: workers commit chosen offsets (streams/worker.py)"),
    ("faust-streaming", "faust.transport.drivers.aiokafka.AIOKafkaConsumerThread", "_create_worker_consumer", "streams/kafka_io.py faust_read_committed"),
    ("faust-streaming", "faust.transport.drivers.aiokafka.Producer", "_settings_extra", "streams/kafka_io.py faust_idempotent_producer"),
    ("faust-streaming", "faust.Worker", "_on_sigterm", "streams/kafka_io.py faust_worker_draining_first: workers drain on SIGTERM before faust stops"),
    ("faust-streaming", "faust.Worker", "_on_sigint", "streams/kafka_io.py faust_worker_draining_first"),
    ("faust-streaming", "faust.Worker", "_schedule_shutdown", "streams/kafka_io.py faust_worker_draining_first: faust's own stop, after the drain (mode.Worker)"),
]
"""Every private attribute of aiokafka and faust that Legato uses (and the members of private objects it calls), all
in this module and ``legato.streams.kafka_io``: tests/test_private_api.py checks each still exists and that no other
module reaches for them."""

_PARTITIONER = DefaultPartitioner()
_CACHED_KEYS = 65_536
"""Keys whose partition is remembered: aiokafka's murmur2 is pure Python (7.6 µs a key here), and a coordinator
hashes the same run_id for every record of a run (its completions, its requests, its events)."""
_partitions: dict[tuple[bytes, int], int] = {}


def partition_for(key: bytes, partitions: int) -> int:
    """The partition of ``key`` among ``partitions`` (murmur2, like every run-keyed record's producer)."""
    cached = _partitions.get((key, partitions))
    if cached is None:
        everything = list(range(partitions))
        cached = _PARTITIONER(key, everything, everything)
        if len(_partitions) >= _CACHED_KEYS:
            _partitions.clear()  # simpler than an LRU, and a run's records come close together
        _partitions[(key, partitions)] = cached
    return cached


def keyed_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's default partitioner (``AIOKafkaProducer(partitioner=...)``) with murmur2 remembered per key: the
    same partition for every key, as the Java client and every other default producer choose."""
    if key is None:
        return _PARTITIONER(key, all_partitions, available)
    return all_partitions[partition_for(key, len(all_partitions))]


def reader(bootstrap: str, *, from_beginning: bool = True, **kafka: Any) -> AIOKafkaConsumer:
    """A consumer without a group that reads committed records only (``kafka`` adds or overrides settings)."""
    # auto_offset_reset matches the seek of assign_all: a reset racing the seek must not move the position elsewhere
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                            auto_offset_reset="earliest" if from_beginning else "latest", **{"isolation_level": "read_committed", **kafka})


async def fresh_metadata(consumer: AIOKafkaConsumer) -> Any:
    """The cluster's metadata for every topic, asked of the broker now (``ClusterMetadata``: ``topics()``,
    ``partitions_for_topic``). Private in aiokafka: its public lookup answers from metadata that may be stale."""
    return await consumer._client.fetch_all_metadata()


async def partitions_of(consumer: AIOKafkaConsumer, topic: str, wait: float = 0.0) -> list[int]:
    """The partition numbers of ``topic``, asking the broker again for up to ``wait`` seconds while it has none
    (a topic just created); [] when it still has none."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        metadata = await fresh_metadata(consumer)
        partitions = metadata.partitions_for_topic(topic)
        if partitions or loop.time() >= deadline:
            return sorted(partitions or [])
        await asyncio.sleep(0.1)


async def assign_all(consumer: AIOKafkaConsumer, topics: list[str], *, from_beginning: bool, wait: float = 5.0,
                     missing: Callable[[str], None] | None = None) -> list[TopicPartition]:
    """Assign every partition of ``topics`` (waiting up to ``wait`` s for each to exist), seek to the beginning or
    the end, and resolve the positions now, so that nothing produced after this returns is missed.

    A topic without partitions is skipped, or reported to ``missing`` (which may raise)."""
    tps: list[TopicPartition] = []
    for topic in topics:
        partitions = await partitions_of(consumer, topic, wait)
        if not partitions and missing is not None:
            missing(topic)
        tps += [TopicPartition(topic, p) for p in partitions]
    if tps:
        await assign(consumer, tps, from_beginning=from_beginning)
    return tps


async def assign(consumer: AIOKafkaConsumer, tps: list[TopicPartition], *, from_beginning: bool) -> None:
    """Assign ``tps``, seek to their beginning or end, and resolve the positions now."""
    consumer.assign(tps)
    if from_beginning:
        await consumer.seek_to_beginning(*tps)
    else:
        await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)


async def read_partition(consumer: AIOKafkaConsumer, tp: TopicPartition, on_record: Callable[[Any], None], timeout: float | None = None,
                         max_records: int = 10_000) -> None:
    """Read ``tp`` from its beginning to the last stable offset seen now, calling ``on_record`` for each record.
    ``consumer`` is a started :func:`reader`; TimeoutError after ``timeout`` seconds."""
    consumer.assign([tp])
    end = (await consumer.end_offsets([tp]))[tp]
    await consumer.seek_to_beginning(tp)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while await consumer.position(tp) < end:
        if deadline is not None and loop.time() > deadline:
            raise TimeoutError(f"reading {tp.topic}[{tp.partition}] took longer than {timeout}s")
        for records in (await consumer.getmany(tp, timeout_ms=1000 if deadline is None else 500, max_records=max_records)).values():
            for record in records:
                on_record(record)


async def offsets_of(consumer: AIOKafkaConsumer, tp: TopicPartition) -> tuple[int, int]:
    """The first offset of ``tp`` still in the log and its end (the last stable offset for a read_committed
    :func:`reader`)."""
    start = (await consumer.beginning_offsets([tp]))[tp]
    end = (await consumer.end_offsets([tp]))[tp]
    return start, end


async def read_range(consumer: AIOKafkaConsumer, tp: TopicPartition, lo: int, hi: int, on_record: Callable[[Any], None],
                     deadline: float | None = None, max_records: int = 10_000) -> None:
    """Read ``tp`` from offset ``lo`` until the position reaches ``hi``, calling ``on_record`` for each record (the last
    batch may go past ``hi``). ``consumer`` is a started :func:`reader`; TimeoutError once the event loop's clock
    passes ``deadline``."""
    consumer.assign([tp])
    consumer.seek(tp, lo)
    loop = asyncio.get_running_loop()
    while await consumer.position(tp) < hi:
        if deadline is not None and loop.time() > deadline:
            raise TimeoutError(f"reading {tp.topic}[{tp.partition}] {lo}..{hi} did not finish in time")
        for records in (await consumer.getmany(tp, timeout_ms=500, max_records=max_records)).values():
            for record in records:
                on_record(record)


async def refused(consumer: AIOKafkaConsumer, topic: str) -> bool:
    """True when the broker refuses this principal ``topic`` (a listing of all topics just leaves it out)."""
    from aiokafka.errors import TopicAuthorizationFailedError
    from aiokafka.protocol.metadata import MetadataRequest

    client = consumer._client  # private: aiokafka has no public per-topic metadata request
    response = await client.send(client.get_random_node(), MetadataRequest([topic], allow_auto_topic_creation=False))
    return any(t[1] == topic and t[0] == TopicAuthorizationFailedError.errno for t in response.topics)
