"""Legato on a 3-broker cluster (replication factor 3, min.insync.replicas 2): the broker leading the run changelog
and completions partitions is SIGKILLed with runs in flight, and every run still ends exactly once."""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from legato.streams.admin import TopicMismatch, ensure_topics
from legato.tools.chaos_cluster import scenario_cluster
from legato.tools.kafka_cluster import LocalCluster, free_base_port
from legato.topics.names import Topics

pytestmark = pytest.mark.integration

RUNS = 240


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(free_base_port(3), Path(tempfile.mkdtemp(prefix="legato-cluster-")), 3, heap="-Xmx384m")
    try:
        c.start()
        yield c
    finally:
        c.cleanup()


async def test_a_topic_replicated_less_than_the_setting_stops_a_start(cluster):
    topics = Topics("clrep")
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topics.runs, 2, 1)])
    finally:
        await admin.close()
    await asyncio.sleep(1.0)  # the new topic reaches every broker's metadata
    with pytest.raises(TopicMismatch, match=f"topic {topics.runs} has replication factor 1"):
        await ensure_topics(cluster.bootstrap, topics, [], 2)
    assert await ensure_topics(cluster.bootstrap, Topics("clok"), [], 2) == 3  # the default factor on 3 brokers
    isr: dict = {}
    for _ in range(50):  # a new topic's partitions reach the metadata shortly after its creation
        isr = await cluster.in_sync(["clok.runs"])
        if isr and all(len(r) == 3 for r in isr.values()):
            break
        await asyncio.sleep(0.2)
    assert isr and all(r == [1, 2, 3] for r in isr.values()), isr


async def test_a_leader_broker_sigkilled_with_runs_in_flight_loses_and_duplicates_nothing(cluster, tmp_path):
    r = await scenario_cluster(runs=RUNS, rate=20.0, phases=("leader",), extra_env={"LEGATO_SESSION_TIMEOUT": "6"}, timeout=120,
                               workdir=tmp_path, partitions=4, heal=False, cluster=cluster)
    assert r["all_finished"] and r["lost"] == 0 and r["completed"] == RUNS, r
    assert r["wrong_output"] == 0 and r["conflicting_terminal"] == 0, r
    assert r["duplicate_terminal_events"] == 0, r
    assert r["duplicate_executions"] == 0, r
    assert r["failed_answered_in_time"] == 0, r
    kill = [e for e in r["events"] if e["event"].startswith("SIGKILL broker")]
    assert len(kill) == 1 and kill[0]["in_flight"] > 0 and kill[0]["finished_before"] < RUNS, r  # runs were in flight when the leader died
    assert r["processes_alive"], r
