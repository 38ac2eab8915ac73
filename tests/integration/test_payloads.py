"""Claim checks on the development broker (issue 27): values past a Kafka record travel by reference."""
from __future__ import annotations

import hashlib

import orjson
import pytest

from legato.topics.payloads import KafkaPayloadStore, PayloadError, PayloadRef, Payloads, is_ref

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_the_kafka_store_keeps_20_mb_in_chunks_and_deletes_them(legato):
    payloads = Payloads(KafkaPayloadStore(legato.bootstrap, legato.topics.payloads))
    value = {"text": "é" * 10_000_000}
    try:
        ref = await payloads.put("store-test", value)
        parsed = PayloadRef.model_validate(ref)
        data = orjson.dumps(value)
        assert parsed.size == len(data) and parsed.sha256 == hashlib.sha256(data).hexdigest()
        assert parsed.chunks == -(-len(data) // 900_000) and parsed.partition is not None
        assert await payloads.fetch(ref) == value
        records = await legato.read_topic(legato.topics.payloads)
        mine = [r for r in records if r.key.startswith(parsed.id.encode())]
        assert len(mine) == parsed.chunks and max(len(r.value) for r in mine) <= 900_000
        assert {r.partition for r in mine} == {parsed.partition}
        await payloads.delete(ref)
        with pytest.raises(PayloadError, match="chunks found"):
            await payloads.fetch(ref)
    finally:
        await payloads.stop()


async def test_a_20_mb_activity_output_travels_by_reference(legato):
    event = await legato.run("e2e_huge", {"bytes": 20_000_000}, timeout=90)
    assert event.status == "succeeded", event
    assert is_ref(event.output) and event.output["size"] == 20_000_011, event.output
    assert await legato.client.fetch(event.output) == {"text": "x" * 20_000_000}
    small = await legato.run("e2e_huge", {"bytes": 1000}, timeout=30)
    assert small.status == "succeeded" and small.output == {"text": "x" * 1000}, small
    legato.assert_alive()
