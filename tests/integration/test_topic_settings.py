"""Topics Legato creates carry the replication settings, and a coordinator refuses topics it cannot run on."""
from __future__ import annotations

import os
import subprocess
import uuid

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from legato.streams.admin import Replication, ensure_topics
from legato.topics.names import Topics
from tests.integration.conftest import legato_executable


async def _config(bootstrap: str, topic: str, key: str) -> str | None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {key: None})])
        for _code, _msg, _type, _name, entries in response.resources:
            for entry in entries:
                if entry[0] == key:
                    return entry[1]
        return None
    finally:
        await admin.close()


async def test_created_topics_carry_min_insync_replicas_and_the_factor_the_cluster_allows(kafka_bootstrap: str) -> None:
    topics = Topics(f"rep{uuid.uuid4().hex[:8]}")
    factor = await ensure_topics(kafka_bootstrap, topics, ["act"], 2, compacted=[topics.changelog], replication=Replication(None, None))
    assert factor == 1  # the test broker is one broker: the default is the number of brokers when fewer than 3
    assert await _config(kafka_bootstrap, topics.runs, "min.insync.replicas") == "1"
    assert await _config(kafka_bootstrap, topics.changelog, "cleanup.policy") == "compact"


async def test_a_coordinator_refuses_a_changelog_with_another_partition_count_naming_it(kafka_bootstrap: str, tmp_path) -> None:
    prefix = f"rep{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topics.changelog, 3, 1)])
    finally:
        await admin.close()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LEGATO_")}, "LEGATO_BOOTSTRAP": kafka_bootstrap,
           "LEGATO_TOPIC_PREFIX": prefix, "LEGATO_PARTITIONS": "4", "LEGATO_DATA_DIR": str(tmp_path)}
    proc = subprocess.run([legato_executable(), "coordinator"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"topic {topics.changelog} has 3 partitions" in proc.stderr and "LEGATO_PARTITIONS" in proc.stderr
    assert "Traceback" not in proc.stderr
