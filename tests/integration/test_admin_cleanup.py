"""``delete_topics_under``: ``legato demo`` and ``legato bench`` delete the topics of their throwaway prefixes, and
nothing else (a prefix that merely starts the same stays)."""
from __future__ import annotations

import asyncio
import uuid

from aiokafka.admin import AIOKafkaAdminClient

from legato.streams.admin import delete_topics_under, ensure_topics
from legato.topics.names import Topics


async def _names(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def test_the_topics_of_a_prefix_are_deleted_and_a_longer_prefix_s_stay(kafka_bootstrap: str) -> None:
    mine = Topics(f"cln{uuid.uuid4().hex[:8]}")
    neighbour = Topics(mine.prefix + "x")  # starts with mine's prefix, is not under it
    for topics in (mine, neighbour):
        await ensure_topics(kafka_bootstrap, topics, ["act"], 1, compacted=[topics.changelog])
    for _ in range(50):  # a created topic reaches the metadata shortly after the request
        created = {t for t in await _names(kafka_bootstrap) if t.startswith(mine.prefix)}
        if {mine.changelog, neighbour.changelog} <= created:
            break
        await asyncio.sleep(0.2)
    assert mine.changelog in created and neighbour.changelog in created and mine.requests("act") in created

    deleted = await delete_topics_under(kafka_bootstrap, [mine.prefix])

    assert deleted and all(t.startswith(mine.prefix + ".") or t.startswith(mine.prefix + "-") for t in deleted)
    assert mine.changelog in deleted and mine.requests("act") in deleted and not any(t.startswith(neighbour.prefix) for t in deleted)
    for _ in range(50):  # deletion reaches the metadata shortly after the request
        left = {t for t in await _names(kafka_bootstrap) if t.startswith(mine.prefix)}
        if not left & set(deleted):
            break
        await asyncio.sleep(0.2)
    assert not left & set(deleted) and neighbour.changelog in left
    await delete_topics_under(kafka_bootstrap, [neighbour.prefix])
    assert await delete_topics_under(kafka_bootstrap, []) == []
