"""The Kafka helpers every part of Legato shares, and, with ``legato.topics.kafka_io`` (the readers and the
partitioner the contract's client needs, re-exported here), the only modules that touch aiokafka's or faust's
private API (pyproject.toml bounds both versions; a new version is checked here first).

- re-exported from ``legato.topics.kafka_io``: :func:`reader`, :func:`assign_all`, :func:`assign`,
  :func:`read_partition`, :func:`read_range`, :func:`offsets_of`, :func:`fresh_metadata`, :func:`partitions_of`,
  :func:`refused`, :func:`partition_for`, :func:`keyed_partitioner`;
- :func:`group_membership`: a group consumer's member id and generation (aiokafka keeps them private);
- :func:`fetched_position`, :func:`committed_offsets`: a consumer's position and its group's offsets without round trips;
- :func:`faust_commit`: a faust consumer commits offsets chosen by the worker;
- :func:`admin_request`: a request the admin client has no method for (CreateAcls);
- :func:`faust_read_committed`, :func:`faust_idempotent_producer`, :func:`transaction_retry_backoff`: settings faust
  and aiokafka do not expose.

Every private name used is listed in ``legato.topics.kafka_io.PRIVATE_API`` (tests/test_private_api.py).
"""
from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from aiokafka import AIOKafkaConsumer, TopicPartition

from legato.topics.kafka_io import (  # noqa: F401  (re-exported: the contract's readers, shared by every part)
    _CACHED_KEYS,
    _partitions,
    assign,
    assign_all,
    fresh_metadata,
    keyed_partitioner,
    offsets_of,
    partition_for,
    partitions_of,
    read_partition,
    read_range,
    reader,
    refused,
)

log = logging.getLogger("legato.worker")


@asynccontextmanager
async def transaction(producer: Any) -> AsyncIterator[None]:
    """``async with transaction(producer): ...``: begin a transaction, commit it when the block ends, abort it when the
    block or the commit raises (and re-raise). The block awaits every send's delivery before it ends: aiokafka would
    commit a transaction in which a record failed. An abort that fails (fenced, or fatal) is left to the next owner's
    producer, which aborts the transaction anyway when it starts."""
    await producer.begin_transaction()
    try:
        yield
        await producer.commit_transaction()
    except BaseException:
        try:
            await producer.abort_transaction()
        except Exception:
            pass
        raise


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


async def faust_commit(consumer: Any, offsets: dict[TopicPartition, int]) -> bool:
    """Commit ``offsets`` (the next offset to read, per partition) on a faust consumer (``app.consumer``); True when
    committed. Private in faust: its public commit takes the offsets of acknowledged messages, not offsets one
    chooses (streams/worker_offsets.py says why workers choose)."""
    return await consumer._commit(offsets)


async def admin_request(admin: Any, request: Any) -> Any:
    """Send ``request`` (an aiokafka protocol request) through a started ``AIOKafkaAdminClient`` and return the
    response. Private in aiokafka: the admin client has no method for some requests (CreateAcls)."""
    return await admin._send_request(request)


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


def faust_worker_draining_first(app: Any, drain: Any, **kwargs: Any) -> Any:
    """A ``faust.Worker`` for ``app`` whose first SIGTERM or SIGINT awaits ``drain()`` (None: nothing to drain) before
    faust's usual stop; a second signal stops at once. faust has no public hook between the signal and the stop, so
    this overrides its signal handlers (private in faust and mode)."""
    import faust

    class DrainingWorker(faust.Worker):
        _draining: asyncio.Future | None = None

        def _on_sigterm(self) -> None:
            self._drain_then_stop(signal.SIGTERM)

        def _on_sigint(self) -> None:
            self._drain_then_stop(signal.SIGINT)

        def _drain_then_stop(self, sig: signal.Signals) -> None:
            if drain is None or self._draining is not None:
                self._schedule_shutdown(sig)  # nothing to drain, or a second signal: stop now
                return
            log.warning("%s: draining before stopping (send it again to stop at once)", sig.name)

            async def drain_then_stop() -> None:
                try:
                    await drain()
                except Exception:
                    log.exception("the drain failed; stopping")
                self._schedule_shutdown(sig)

            self._draining = asyncio.ensure_future(drain_then_stop(), loop=self.loop)

    return DrainingWorker(app, **kwargs)


def transaction_retry_backoff(seconds: float) -> None:
    """How long aiokafka waits before it asks again to add a partition to a new transaction that the broker refused
    with CONCURRENT_TRANSACTIONS (the previous transaction's commit markers are still being written: a millisecond or
    two on a healthy broker). aiokafka hard-codes 20 ms (``sender.BACKOFF_OVERRIDE``, private); a partition busy enough
    to start its next transaction at once met it on most transactions (BENCHMARKS.md, latency). Idempotent."""
    from aiokafka.producer import sender

    sender.BACKOFF_OVERRIDE = seconds
