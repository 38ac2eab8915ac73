"""Topic creation up front: every run-keyed topic gets the same partition count, every topic the same replication."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, NotControllerError, for_code

from legato.streams import security
from legato.topics.names import Topics

log = logging.getLogger("legato.admin")

_COMPACTED = {"cleanup.policy": "compact", "segment.ms": "3600000", "min.cleanable.dirty.ratio": "0.25"}
"""Compacted topics roll a segment every hour, so the log cleaner can take all but the last hour: without it the
changelog a restore reads is every state, tombstone and offsets record written until a 7-day (or 1 GiB) roll
(BENCHMARKS.md, retention). ``delete.retention.ms`` keeps its 24 h: a tombstone outlives any restore."""

DEFAULT_REPLICATION_FACTOR = 3
CREATE_RETRY_S = 60.0
"""How long topic creation keeps trying while a cluster that just started (or lost a broker) elects its controller
and registers its brokers (NOT_CONTROLLER, broker not available, too few brokers for the replication factor)."""

_TOPIC_ALREADY_EXISTS = 36
_TOPIC_AUTHORIZATION_FAILED = 29
"""A principal without CREATE (a worker under ACLs) does not see the topics it may not describe either, so they look
missing to it: they are the operator's or the coordinator's to create, and using one that is truly missing fails
with its own error later."""
_RETRIABLE_CREATE = {7, 8, 19, 38, 41}
"""RequestTimedOut, BrokerNotAvailable, NotEnoughReplicas, InvalidReplicationFactor (brokers still registering),
NotController."""


class TopicMismatch(RuntimeError):
    """A topic Legato uses exists with a partition count or replication it cannot run on; the message names the
    topic and the fix. Never worked around: another partition count moves keys, a lower replication loses runs."""


@dataclass(frozen=True)
class Replication:
    """The replication of the topics Legato creates: ``factor`` (None: 3, or the cluster's broker count when fewer)
    and ``min_insync`` (None: factor − 1, at least 1)."""

    factor: int | None = None
    min_insync: int | None = None

    def resolve(self, brokers: int) -> tuple[int, int]:
        """``(factor, min.insync.replicas)`` on a cluster of ``brokers`` brokers."""
        factor = self.factor if self.factor is not None else max(1, min(DEFAULT_REPLICATION_FACTOR, brokers))
        min_insync = self.min_insync if self.min_insync is not None else max(1, factor - 1)
        return factor, min(min_insync, factor)


async def ensure_topics(bootstrap: str, topics: Topics, activities: list[str], partitions: int, extra: list[str] | None = None,
                        compacted: list[str] | None = None, replication: Replication = Replication()) -> int:
    """Create the contract's topics that are missing, replicated as ``replication`` says; returns the factor used.

    ``extra`` names further topics to create (workflows' completion topics). A run-keyed topic (the changelog among
    ``compacted`` included) with another partition count, or any of them replicated less than the factor on a
    cluster with the brokers for it, raises :class:`TopicMismatch`.
    """
    compact = {topics.cache, topics.definitions, topics.schedules, topics.payloads, topics.limits_changelog, *(compacted or [])}
    # the limiter's changelog partition p belongs to limits partition p: they share the count too
    run_keyed = [*topics.run_keyed(sorted(activities)), *(t for t in (compacted or []) if t == topics.changelog), topics.limits, topics.limits_changelog]
    names = list(dict.fromkeys([topics.triggers, topics.dlq, topics.cache, topics.definitions, topics.schedules, topics.payloads, topics.limits,
                                topics.limits_changelog, *topics.run_keyed(sorted(activities)),
                                *(extra or []), *(compacted or [])]))
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="legato-admin", **security.aiokafka_kwargs())
    await admin.start()
    try:
        deadline = time.monotonic() + CREATE_RETRY_S
        brokers = len((await _retrying(admin.describe_cluster, deadline)).get("brokers", []))
        factor, min_insync = replication.resolve(brokers)
        existing = set(await _retrying(admin.list_topics, deadline))
        present = [n for n in names if n in existing]
        if present:
            check_topics(await _retrying(lambda: admin.describe_topics(present), deadline), run_keyed, partitions, factor, brokers)
        missing = [n for n in names if n not in existing]
        if missing:
            configs = {"min.insync.replicas": str(min_insync)}
            await _create(admin, [NewTopic(n, partitions, factor, topic_configs={**configs, **(_COMPACTED if n in compact else {})})
                                  for n in missing])
        return factor
    finally:
        await admin.close()


def check_topics(described: list[dict], run_keyed: list[str], partitions: int, factor: int, brokers: int) -> None:
    """Raise :class:`TopicMismatch` for the first topic of ``described`` (``describe_topics`` answers) that a
    coordinator cannot run on: a run-keyed one whose partition count is not ``partitions``, or one replicated less
    than ``factor`` while the cluster has ``factor`` brokers (on fewer, nothing could be replicated more)."""
    for desc in described:
        name, parts = desc["topic"], desc.get("partitions", [])
        count = len(parts)
        if name in run_keyed and count and count != partitions:
            raise TopicMismatch(
                f"topic {name} has {count} partitions but Legato's run-keyed topics need {partitions} (LEGATO_PARTITIONS): "
                "every record of a run must land on the same partition number. Set LEGATO_PARTITIONS to the count the "
                f"other topics have, or recreate {name} with {partitions} partitions after draining it; adding "
                "partitions moves keys to other partitions (docs/deploy.md, partition counts)")
        replicas = min((len(p.get("replicas", [])) for p in parts), default=factor)
        if replicas < factor <= brokers:
            raise TopicMismatch(
                f"topic {name} has replication factor {replicas} but Legato replicates on {factor} brokers (LEGATO_REPLICATION_FACTOR) and the cluster "
                f"has {brokers} brokers: losing one broker can lose runs. Add replicas with kafka-reassign-partitions.sh "
                f"(a reassignment listing {factor} brokers per partition of {name}), or set LEGATO_REPLICATION_FACTOR={replicas} "
                "to accept it (docs/deploy.md, topics)")


def _retriable(exc: BaseException) -> bool:
    """An error of a cluster that is electing, or of a broker that is down while others are not."""
    if isinstance(exc, KafkaError):
        return exc.retriable or isinstance(exc, NotControllerError)
    return isinstance(exc, (asyncio.TimeoutError, OSError))


async def _retrying(call, deadline: float):
    """``await call()``, again after retriable errors until ``deadline`` (a metadata request sent to a broker that was
    just killed fails until the cluster's metadata drops it)."""
    delay = 0.2
    while True:
        try:
            return await call()
        except Exception as exc:
            if not _retriable(exc) or time.monotonic() >= deadline:
                raise
            log.info("%s: %s; trying again", type(exc).__name__, exc)
        await asyncio.sleep(delay)
        delay = min(2.0, delay * 2)


async def _create(admin: AIOKafkaAdminClient, new: list[NewTopic]) -> None:
    """Create ``new``, retrying the errors of a cluster that is still electing or registering brokers for up to
    ``CREATE_RETRY_S``; a topic another process created first counts as created."""
    deadline = time.monotonic() + CREATE_RETRY_S
    pending = {t.name: t for t in new}
    delay = 0.2
    while True:
        failed: dict[str, Exception] = {}
        try:
            response = await admin.create_topics(list(pending.values()))
            for entry in response.topic_errors:
                name, code = entry[0], entry[1]
                if code == _TOPIC_AUTHORIZATION_FAILED:
                    log.info("not authorized to create topic %s: left to a principal that may", name)
                    continue
                if code and code != _TOPIC_ALREADY_EXISTS:
                    message = entry[2] if len(entry) > 2 and entry[2] else ""
                    error = for_code(code)(f"creating topic {name}: {message}".rstrip(": "))
                    if code not in _RETRIABLE_CREATE:
                        raise error
                    failed[name] = error
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            if not _retriable(exc):
                raise
            failed = {n: exc for n in pending}
        if not failed:
            return
        if time.monotonic() >= deadline:
            name, exc = next(iter(failed.items()))
            raise RuntimeError(f"could not create topic {name} in {CREATE_RETRY_S:.0f}s: {type(exc).__name__}: {exc}") from exc
        log.info("creating %d topics: %s; trying again", len(failed), next(iter(failed.values())))
        pending = {n: pending[n] for n in failed}
        await asyncio.sleep(delay)
        delay = min(2.0, delay * 2)
async def delete_topics_under(bootstrap: str, prefixes: list[str]) -> list[str]:
    """Delete every topic named under one of ``prefixes`` (``<prefix>.…`` and ``<prefix>-…``, as ``Topics`` names
    them); the names it deleted. For the throwaway prefixes of ``legato demo`` and ``legato bench``: a development
    broker that keeps every one of them slows down (2,447 topics made a new topic take over 60 s to show in metadata)."""
    if not prefixes:
        return []
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security.aiokafka_kwargs())
    await admin.start()
    try:
        mine = sorted(t for t in await admin.list_topics() if any(t.startswith(p + ".") or t.startswith(p + "-") for p in prefixes))
        if mine:
            await admin.delete_topics(mine)
        return mine
    finally:
        await admin.close()

