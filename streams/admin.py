"""Topic creation up front: every run-keyed topic gets the same partition count."""
from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from legato.streams import security
from legato.topics.names import Topics


_COMPACTED = {"cleanup.policy": "compact", "segment.ms": "3600000", "min.cleanable.dirty.ratio": "0.25"}
"""Compacted topics roll a segment every hour, so the log cleaner can take all but the last hour: without it the
changelog a restore reads is every state, tombstone and offsets record written until a 7-day (or 1 GiB) roll
(BENCHMARKS.md, retention). ``delete.retention.ms`` keeps its 24 h: a tombstone outlives any restore."""


async def ensure_topics(bootstrap: str, topics: Topics, activities: list[str], partitions: int, extra: list[str] | None = None,
                        compacted: list[str] | None = None) -> None:
    """Create the contract's topics that are missing; refuse a run-keyed topic with another partition count.

    ``extra`` names further topics to create (workflows' completion topics).
    """
    compact = {topics.cache, topics.definitions, topics.schedules, *(compacted or [])}
    names = [topics.triggers, topics.dlq, topics.cache, topics.definitions, topics.schedules, *topics.run_keyed(sorted(activities)), *(extra or []), *(compacted or [])]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="legato-admin", **security.aiokafka_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            try:
                await admin.create_topics([
                    NewTopic(n, partitions, 1, topic_configs=_COMPACTED if n in compact else {})
                    for n in missing
                ])
            except TopicAlreadyExistsError:
                pass  # another process created them first
        present = [n for n in topics.run_keyed(sorted(activities)) if n in existing]
        if present:
            for desc in await admin.describe_topics(present):
                count = len(desc.get("partitions", []))
                if count and count != partitions:
                    raise RuntimeError(
                        f"topic {desc['topic']} has {count} partitions but run-keyed topics need {partitions}; "
                        "every record of a run must land on the same partition number"
                    )
    finally:
        await admin.close()


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

