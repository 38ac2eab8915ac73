"""A private broker with a SASL_PLAINTEXT listener: wrong credentials are refused, the right ones work.

The broker is our own (own port, data dir and config, the local broker's jars), so the shared test broker is never
touched. Clients get their settings only through ``legato.streams.security`` from LEGATO_* variables, as Legato's own
clients do.
"""
from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from legato.streams import security
from legato.tools import kafka_local
from legato.tools.harness import PrivateBroker
from tests.conftest import skip_or_fail

pytestmark = pytest.mark.integration

USERS = {"alice": "alice-" + uuid.uuid4().hex[:12]}


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory):
    if not kafka_local.jars_present():
        skip_or_fail("Kafka jars not fetched (scripts/setup.sh fetches them)")
    broker = PrivateBroker(workdir=tmp_path_factory.mktemp("sasl-broker"), sasl_users=USERS)
    broker.start()
    try:
        yield broker
    finally:
        broker.cleanup()


def env_for(mechanism: str, user: str, password: str) -> dict[str, str]:
    return {"LEGATO_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "LEGATO_SASL_MECHANISM": mechanism,
            "LEGATO_SASL_USERNAME": user, "LEGATO_SASL_PASSWORD": password}


async def round_trip(bootstrap: str, kwargs: dict) -> bytes:
    topic = f"sasl-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=10_000, **kwargs)
    await producer.start()
    try:
        payload = uuid.uuid4().hex.encode()
        for _ in range(40):  # the topic is auto-created on first use
            try:
                await producer.send_and_wait(topic, payload, key=b"k")
                break
            except KafkaError:
                await asyncio.sleep(0.25)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **kwargs)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or (await _partitions(consumer, topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = asyncio.get_running_loop().time() + 20
        while asyncio.get_running_loop().time() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                for m in msgs:
                    return m.value
        raise AssertionError("nothing consumed")
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic) or set()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_right_credentials_produce_and_consume(sasl_broker, mechanism):
    kwargs = security.aiokafka_kwargs(security.from_env(env_for(mechanism, "alice", USERS["alice"])))
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT" and kwargs["sasl_mechanism"] == mechanism
    assert await round_trip(sasl_broker.bootstrap, kwargs)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
@pytest.mark.parametrize("user,password", [("alice", "wrong-password"), ("mallory", "whatever")])
async def test_wrong_credentials_are_refused(sasl_broker, mechanism, user, password):
    kwargs = security.aiokafka_kwargs(security.from_env(env_for(mechanism, user, password)))
    producer = AIOKafkaProducer(bootstrap_servers=sasl_broker.bootstrap, request_timeout_ms=5_000, **kwargs)
    with pytest.raises(KafkaError):
        try:
            await asyncio.wait_for(producer.start(), 30)
            await asyncio.wait_for(producer.send_and_wait("sasl-refused", b"x"), 15)
        finally:
            await producer.stop()


async def test_plaintext_client_gets_nothing(sasl_broker):
    producer = AIOKafkaProducer(bootstrap_servers=sasl_broker.bootstrap, request_timeout_ms=3_000)
    with pytest.raises((KafkaError, asyncio.TimeoutError)):
        try:
            await asyncio.wait_for(producer.start(), 20)
        finally:
            await producer.stop()
