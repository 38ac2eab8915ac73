"""The limiter shell's bookkeeping without a broker: what one turn of a shard decides, grants and marks for its
transaction, and when an idle key is forgotten (docs/limits.md)."""
from __future__ import annotations

from legato.streams.limiter import Shard, _expired
from legato.topics.limits import LimitAcquire, LimitRelease, LimitSpec

T0 = 1_800_000_000_000
RATE = LimitSpec(requests_per_minute=60)  # one every 1 / 0.92 s (PACE), no burst at this rate


def acquire(i: int, spec: LimitSpec = RATE) -> LimitAcquire:
    return LimitAcquire(id=f"r{i}/a/1", limit="llm", key="acme", run_id=f"r{i}", spec=spec, requested_ms=T0)


def test_a_turn_grants_what_fits_and_marks_the_key_for_the_transaction():
    shard = Shard(0, producer=None)
    shard.apply("llm/acme", acquire(1), T0)
    shard.apply("llm/acme", acquire(2), T0)
    assert [g.run_id for g in shard.grants] == ["r1"] and shard.dirty == {"llm/acme"}
    assert shard.next_due_ms(T0) == T0 + 1086 + 1


def test_a_tick_grants_the_waiter_its_rate_admits_once_time_has_passed():
    shard = Shard(0, producer=None)
    shard.apply("llm/acme", acquire(1), T0)
    shard.apply("llm/acme", acquire(2), T0)
    shard.grants, shard.dirty = [], set()
    shard.tick(T0 + 500)
    assert shard.grants == [] and shard.dirty == set()  # nothing due: no transaction
    shard.tick(T0 + 1087)
    assert [g.run_id for g in shard.grants] == ["r2"]


def test_a_release_of_an_unknown_key_changes_nothing():
    shard = Shard(0, producer=None)
    shard.apply("llm/nobody", LimitRelease(id="r9/a/1", limit="llm", key="nobody"), T0)
    assert not shard.pending() and shard.states == {}


def test_an_idle_key_is_forgotten_only_once_its_rate_has_recovered():
    shard = Shard(0, producer=None)
    shard.apply("llm/acme", acquire(1), T0)
    shard.apply("llm/acme", LimitRelease(id="r1/a/1", limit="llm", key="acme"), T0 + 10)
    state = shard.states["llm/acme"]
    assert not _expired(state, T0 + 10)  # forgetting it now would admit a second request within the second
    shard.dirty = set()
    shard.tick(T0 + 10_000)
    assert "llm/acme" not in shard.states and shard.dirty == {"llm/acme"}  # a tombstone goes to the changelog


def run_acquire(name: str, triggered_ms: int) -> LimitAcquire:
    return LimitAcquire(id=f"run:{name}", limit="run:wf", key="cust-1", run_id=name, spec=LimitSpec(concurrency=1), requested_ms=triggered_ms)


def test_a_keyed_run_waits_for_every_trigger_partitions_mark_and_a_mark_only_moves_forward():
    from legato.topics.limits import TriggersDecided

    shard = Shard(0, producer=None)
    assert shard.decided_ms() == 0  # no partition has reported: nothing is known to be decided
    shard.apply("run:wf/cust-1", run_acquire("b", T0 + 300), T0 + 400)
    assert shard.grants == []
    shard.marked(TriggersDecided(partitions=2, marks={0: T0 + 500}))  # partition 1 has not reported
    shard.tick(T0 + 460)
    assert shard.decided_ms() == 0 and shard.grants == []
    shard.marked(TriggersDecided(partitions=2, marks={1: T0 + 200}))  # 1 has not decided past b's trigger
    shard.marked(TriggersDecided(partitions=2, marks={0: T0 + 100}))  # a stale mark of 0 changes nothing
    shard.tick(T0 + 480)
    assert shard.decided_ms() == T0 + 200 and shard.grants == []
    shard.apply("run:wf/cust-1", run_acquire("a", T0 + 150), T0 + 490)  # the earlier trigger, decided late
    shard.marked(TriggersDecided(partitions=2, marks={1: T0 + 600}))
    shard.tick(T0 + 510)
    assert [g.run_id for g in shard.grants] == ["a"]


def test_marks_alone_commit_where_the_partition_resumes_only_every_few_seconds():
    from legato.topics.limits import TriggersDecided

    shard = Shard(0, producer=None)
    shard.committed(T0)
    shard.marked(TriggersDecided(partitions=1, marks={0: T0}))
    shard.tick(T0 + 100)
    assert not shard.pending()  # not a transaction per mark
    shard.tick(T0 + 5_000)
    assert shard.pending() and shard.offset_moved
