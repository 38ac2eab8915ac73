"""Tests for legato.tools.kafka_local: config rendering (unit) and a real round trip (integration)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from legato.tools import kafka_local


def _props(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


@pytest.mark.parametrize(
    ("bootstrap", "port", "cport"),
    [
        ("localhost:9092", 9092, 9093),
        ("127.0.0.1:19092", 19092, 19093),
        ("PLAINTEXT://127.0.0.1:29092,127.0.0.1:29094", 29092, 29093),
        ("localhost", 9092, 9093),
    ],
)
def test_server_properties_ports(tmp_path, bootstrap, port, cport):
    props = _props(kafka_local.server_properties(bootstrap, data_dir=tmp_path / "data"))
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == f"1@127.0.0.1:{cport}"
    assert props["listeners"] == f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}"
    assert props["advertised.listeners"] == f"PLAINTEXT://127.0.0.1:{port}"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["log.dirs"] == str(tmp_path / "data")
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
    ):
        assert props[key] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["num.partitions"] == "8"
    assert props["auto.create.topics.enable"] == "true"


def test_paths_follow_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kafka_local.libs_dir() == tmp_path / "legato" / "kafka-3.9.1" / "libs"
    assert kafka_local.broker_dir() == tmp_path / "legato" / "broker"
    # the test broker's directory (pid file, data) is not the development broker's
    assert kafka_local.broker_dir("127.0.0.1:19092") == tmp_path / "legato" / "broker-19092"
    assert not kafka_local.jars_present()


def test_is_local():
    assert kafka_local.is_local("localhost:9092")
    assert kafka_local.is_local("127.0.0.1:19092")
    assert not kafka_local.is_local("kafka:19092")


def test_ensure_broker_refuses_remote_dead_bootstrap():
    # Port 1 on a reserved TEST-NET address: nothing answers, and it is not local.
    with pytest.raises(RuntimeError, match="not on localhost"):
        kafka_local.ensure_broker("192.0.2.1:1")


@pytest.mark.integration
def test_broker_alive(kafka_bootstrap):
    assert kafka_local.broker_alive(kafka_bootstrap)
    assert not kafka_local.broker_alive("127.0.0.1:1", timeout=1.0)


@pytest.mark.integration
@pytest.mark.asyncio
async def test_broker_alive_inside_running_loop(kafka_bootstrap):
    # The sync helper must work even when called from async code.
    assert kafka_local.broker_alive(kafka_bootstrap)
    assert await kafka_local.broker_alive_async(kafka_bootstrap)


@pytest.mark.integration
@pytest.mark.asyncio
async def test_produce_consume_roundtrip(kafka_bootstrap):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = f"legato-test-{uuid.uuid4().hex[:12]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        assert topic in await admin.list_topics()
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k1")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"legato-test-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        msg = await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()
    assert (msg.key, msg.value) == (b"k1", b"hello")

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


def test_a_local_cluster_s_nodes_form_one_quorum_on_every_second_port(tmp_path):
    from legato.tools.kafka_cluster import LocalCluster

    cluster = LocalCluster(9092, tmp_path, 3)
    assert cluster.bootstrap == "127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096"
    for node, port in ((1, 9092), (2, 9094), (3, 9096)):
        props = _props(cluster.properties(node))
        assert props["node.id"] == str(node)
        assert props["process.roles"] == "broker,controller"
        assert props["controller.quorum.voters"] == "1@127.0.0.1:9093,2@127.0.0.1:9095,3@127.0.0.1:9097"
        assert props["listeners"] == f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{port + 1}"
        assert props["log.dirs"] == str(tmp_path / f"node-{node}" / "data")
        assert props["offsets.topic.replication.factor"] == props["transaction.state.log.replication.factor"] == "3"
        assert props["transaction.state.log.min.isr"] == props["min.insync.replicas"] == "2"


def test_local_brokers_allow_session_timeouts_below_kafka_s_six_second_floor(tmp_path):
    assert int(_props(kafka_local.server_properties("localhost:9092", tmp_path))["group.min.session.timeout.ms"]) <= 1000
