"""The partition helpers every producer of Legato shares: the same partition as aiokafka's (and the Java client's)
default partitioner, for every key, whether remembered or not."""
from __future__ import annotations

import uuid

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from legato.streams import kafka_io


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=0, max_size=64), partitions=st.integers(min_value=1, max_value=64))
def test_partition_for_and_the_keyed_partitioner_choose_what_the_default_partitioner_chooses(key: bytes, partitions: int) -> None:
    everything = list(range(partitions))
    expected = DefaultPartitioner()(key, everything, everything)
    assert kafka_io.partition_for(key, partitions) == expected
    assert kafka_io.partition_for(key, partitions) == expected  # the remembered answer is the same
    assert kafka_io.keyed_partitioner(key, everything, everything[:1]) == expected  # availability does not move a key


def test_the_keyed_partitioner_maps_onto_the_topic_s_own_partition_ids_and_spreads_records_without_a_key() -> None:
    key = str(uuid.uuid4()).encode()
    ids = [3, 5, 9, 11]  # aiokafka passes the topic's partition ids, not always 0..n-1
    assert kafka_io.keyed_partitioner(key, ids, ids) == ids[kafka_io.partition_for(key, 4)]
    chosen = {kafka_io.keyed_partitioner(None, ids, ids[:2]) for _ in range(200)}
    assert chosen <= {3, 5} and len(chosen) == 2  # no key: a random available partition, as aiokafka does


def test_a_key_s_partition_is_remembered_and_the_memory_stays_bounded() -> None:
    for i in range(kafka_io._CACHED_KEYS + 10):
        kafka_io.partition_for(str(i).encode(), 8)
    last = (str(kafka_io._CACHED_KEYS + 9).encode(), 8)
    assert last in kafka_io._partitions  # remembered: murmur2 is not computed again for this key
    assert 0 < len(kafka_io._partitions) <= kafka_io._CACHED_KEYS


# Reference values from the Java client (kafka-clients 3.9.1), computed with jshell:
#   Utils.murmur2(key.getBytes(UTF_8)) and Utils.toPositive(Utils.murmur2(bytes)) % partitions
# for partitions 1, 3, 8, 12 and 64: the partition every default Java producer picks for the key.
JAVA_MURMUR2 = [
    ("", 275646681, (0, 0, 1, 9, 25)),
    ("a", -1563381124, (0, 1, 4, 4, 60)),
    ("run-1", 637533037, (0, 1, 5, 1, 45)),
    ("hello", 2132663229, (0, 0, 5, 9, 61)),
    ("legato", 2014972864, (0, 1, 0, 4, 0)),
    ("0123456789", -631703640, (0, 2, 0, 8, 40)),
    ("a8f2c1d0-5b7e-4c3a-9f1e-2d6b8a4c7e90", 916187944, (0, 1, 0, 4, 40)),
    ("ütf-8 ключ", -1995336932, (0, 0, 4, 0, 28)),
    ("due_diligence/run/42", -1335888537, (0, 2, 7, 11, 39)),
    ("\u0000\u0001\u00ff", -487287704, (0, 0, 0, 0, 40)),
]


def test_partitions_match_the_java_client_s_murmur2_reference_values() -> None:
    """Not a comparison with aiokafka (which could be wrong the same way): hard-coded values of the Java client."""
    from aiokafka.partitioner import murmur2

    for key, java_hash, java_partitions in JAVA_MURMUR2:
        raw = key.encode("utf-8")
        assert murmur2(raw) & 0xFFFFFFFF == java_hash & 0xFFFFFFFF, key
        for partitions, expected in zip((1, 3, 8, 12, 64), java_partitions):
            assert kafka_io.partition_for(raw, partitions) == expected, (key, partitions)
            everything = list(range(partitions))
            assert kafka_io.keyed_partitioner(raw, everything, everything) == expected, (key, partitions)


async def test_the_workers_faust_producer_is_idempotent_with_acks_all():
    """A completion written by a leader that died before acknowledging it is not written twice by the retry."""
    import faust

    from legato.streams import kafka_io

    kafka_io.faust_idempotent_producer()
    app = faust.App("legato-test-idempotent", broker="kafka://127.0.0.1:1", producer_acks=-1)
    producer = app.producer._new_producer()
    assert producer._txn_manager is not None  # aiokafka keeps a transaction manager for idempotent producers only
    assert producer._txn_manager.transactional_id is None  # idempotent, not transactional
