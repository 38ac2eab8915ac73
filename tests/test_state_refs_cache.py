"""The coordinator's payload prefetch reads a large stored state for references once, not at each of its run's
records: a ``map`` over 10,000 items has a state of megabytes, and reading it per completion made the fan-out
quadratic (BENCHMARKS.md, fan-out)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from unittest import mock

import orjson

from legato.streams.coordinator import partition as partition_module
from legato.streams.coordinator.partition import Partitions
from legato.streams.coordinator.payloads import PayloadValues

REF = {"$ref": "legato-payload:r1/" + "a" * 64, "size": 300_000, "sha256": "a" * 64, "chunks": 1, "partition": 0}


def _partitions(prefetched: list) -> Partitions:
    p = Partitions.__new__(Partitions)  # the prefetch's own state only: no Kafka
    p._large_state_refs = {}

    class Payloads:
        refs_of = staticmethod(PayloadValues.refs_of)

        async def prefetch(self, refs):
            prefetched.append([r.id for r in refs])

    p.payloads = Payloads()
    return p


def test_a_large_state_is_read_for_references_once_per_poll_and_kept_after():
    big = orjson.dumps({"run_id": "r1", "steps": {"fetch": {"output": REF}}, "pad": "x" * 200_000})
    store = {b"r1": big}
    task = SimpleNamespace(store=store)
    records = [SimpleNamespace(key=b"r1", value=orjson.dumps({"request_id": f"r1/s{i}/1", "run_id": "r1"})) for i in range(50)]
    prefetched: list = []
    p = _partitions(prefetched)
    reads = []
    real = PayloadValues.refs_of

    def counting(data):
        if data is not None and len(data) > 100_000:
            reads.append(len(data))
        return real(data)

    with mock.patch.object(PayloadValues, "refs_of", staticmethod(counting)):
        p.payloads.refs_of = staticmethod(counting)
        asyncio.run(p._prefetch(task, [(None, records, 0.0)]))
        asyncio.run(p._prefetch(task, [(None, records, 0.0)]))  # the next poll: the kept references answer
    assert len(reads) == 1, reads
    assert prefetched and all(ids == [REF["$ref"].split(":", 1)[1]] for ids in prefetched), prefetched


def test_what_is_kept_follows_the_state_stored_and_goes_with_a_forgotten_run():
    """``_seal`` stores each changed state and keeps its references when it is large; a state stored smaller or a
    run forgotten leaves nothing kept, so a later read is of the stored bytes themselves."""
    from legato.streams.coordinator.batch import Batch
    from legato.streams.coordinator.states import DecodedStates

    class Store(dict):
        def put(self, key, value):
            self[key] = value

        def delete(self, key):
            self.pop(key, None)

    class State:
        def __init__(self, doc):
            self.data = orjson.dumps(doc)

        def encoded(self):
            return self.data

    p = _partitions([])
    p.states = DecodedStates()
    task = SimpleNamespace(store=Store())
    pid = REF["$ref"].split(":", 1)[1]

    def seal(state):
        batch = Batch()
        batch.changed = {"r1": state}
        p._seal(task, batch)

    seal(State({"o": REF, "pad": "x" * 100_000}))
    assert [r.id for r in p._large_state_refs[b"r1"]] == [pid]
    assert [r.id for r in p._state_refs(b"r1", task.store[b"r1"])] == [pid]
    seal(State({"pad": "y" * 100_000}))  # stored again, large, without the reference: what is kept follows
    assert p._state_refs(b"r1", task.store[b"r1"]) == []
    seal(State({"o": REF}))  # stored again, small: nothing kept, the bytes are read
    assert b"r1" not in p._large_state_refs and [r.id for r in p._state_refs(b"r1", task.store[b"r1"])] == [pid]
    seal(State({"o": REF, "pad": "x" * 100_000}))
    seal(None)  # forgotten
    assert b"r1" not in p._large_state_refs and b"r1" not in task.store
