"""The Kafka helpers every part of Legato shares, and the only module that touches aiokafka's or faust's private
API (pyproject.toml bounds both versions; a new version is checked here first).

- :func:`reader`, :func:`assign_all`, :func:`assign`, :func:`read_partition`: read topics without a consumer group, committed records
  only (each process sees everything: tails, the client, the coordinator's changelog, ``legato runs show``);
- :func:`refused`: whether the broker refuses this principal a topic (ACLs);
- :func:`partition_for`: the partition of a key, murmur2 as aiokafka and the Java client do by default;
- :func:`group_membership`: a group consumer's member id and generation (aiokafka keeps them private);
- :func:`faust_read_committed`: faust's workers read committed records only.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

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


async def partitions_of(consumer: AIOKafkaConsumer, topic: str, wait: float = 0.0) -> list[int]:
    """The partition numbers of ``topic``, asking the broker again for up to ``wait`` seconds while it has none
    (a topic just created); [] when it still has none."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        metadata = await consumer._client.fetch_all_metadata()  # private: the public lookup uses stale metadata
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


async def refused(consumer: AIOKafkaConsumer, topic: str) -> bool:
    """True when the broker refuses this principal ``topic`` (a listing of all topics just leaves it out)."""
    from aiokafka.errors import TopicAuthorizationFailedError
    from aiokafka.protocol.metadata import MetadataRequest

    client = consumer._client  # private: aiokafka has no public per-topic metadata request
    response = await client.send(client.get_random_node(), MetadataRequest([topic], allow_auto_topic_creation=False))
    return any(t[1] == topic and t[0] == TopicAuthorizationFailedError.errno for t in response.topics)


def group_membership(consumer: AIOKafkaConsumer) -> tuple[Any, Any]:
    """(member id, generation) of a group consumer; (None, None) before it joined."""
    coordinator = getattr(consumer, "_coordinator", None)  # private in aiokafka
    return getattr(coordinator, "member_id", None), getattr(coordinator, "generation", None)


def fetched_position(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The offset up to which ``consumer`` has handed out ``tp``'s records (past transaction markers and aborted
    records too), without a round trip; None when ``tp`` is not assigned or has no position yet. Private in aiokafka
    (0.11–0.14): the public ``position`` is a coroutine that may reset the position."""
    subscription = consumer._subscription  # private
    if not subscription.is_assigned(tp):
        return None
    state = subscription.subscription.assignment.state_value(tp)
    return state.position if state is not None and state.has_valid_position else None


async def committed_offsets(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The group's committed offsets of ``tps`` in one request (assigned to this member or not); a partition without
    one is left out. aiokafka's public ``committed`` asks one partition at a time."""
    found = await consumer._coordinator.fetch_committed_offsets(list(tps))  # private
    return {tp: meta.offset for tp, meta in found.items() if meta.offset >= 0}


def faust_read_committed() -> None:
    """Workers read only committed records: a request from a coordinator transaction that was aborted (the
    coordinator died mid-batch) is never executed; its successor produces the same request again, committed.
    faust reads committed only in its exactly_once mode, which Legato does not use (RELIABILITY.md), so this
    patches the consumer faust creates (private in faust and aiokafka). Idempotent."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if getattr(AIOKafkaConsumerThread, "_legato_read_committed", False):
        return
    create = AIOKafkaConsumerThread._create_worker_consumer

    def create_read_committed(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        consumer._isolation_level = "read_committed"
        return consumer

    AIOKafkaConsumerThread._create_worker_consumer = create_read_committed  # type: ignore[method-assign]
    AIOKafkaConsumerThread._legato_read_committed = True  # type: ignore[attr-defined]


def faust_idempotent_producer() -> None:
    """Workers' producer is idempotent (``acks=all``, ``enable_idempotence``): when a partition leader dies after
    writing a completion but before acknowledging it, the producer's retry is dropped by the broker instead of
    writing the completion twice (``legato chaos cluster`` counted such duplicates). faust turns idempotence on
    only in its exactly_once mode, which Legato does not use, so this patches the producer faust creates (private
    in faust). Idempotent."""
    from faust.transport.drivers.aiokafka import Producer

    if getattr(Producer, "_legato_idempotent", False):
        return
    extra = Producer._settings_extra

    def idempotent(self: Any) -> Any:
        return {**extra(self), "acks": "all", "enable_idempotence": True}

    Producer._settings_extra = idempotent  # type: ignore[method-assign]
    Producer._legato_idempotent = True  # type: ignore[attr-defined]


def transaction_retry_backoff(seconds: float) -> None:
    """How long aiokafka waits before it asks again to add a partition to a new transaction that the broker refused
    with CONCURRENT_TRANSACTIONS (the previous transaction's commit markers are still being written: a millisecond or
    two on a healthy broker). aiokafka hard-codes 20 ms (``sender.BACKOFF_OVERRIDE``, private); a partition busy enough
    to start its next transaction at once met it on most transactions (BENCHMARKS.md, latency). Idempotent."""
    from aiokafka.producer import sender

    sender.BACKOFF_OVERRIDE = seconds
