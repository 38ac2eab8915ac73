"""The limiter shell's bookkeeping without a broker: what one turn of a shard decides, grants and marks for its
transaction, and when an idle key is forgotten (docs/limits.md)."""
from __future__ import annotations

from legato.streams.limiter import Shard, _expired
from legato.topics.limits import LimitAcquire, LimitRelease, LimitSpec

T0 = 1_800_000_000_000
RATE = LimitSpec(requests_per_minute=60)  # one a second, no burst at this rate


def acquire(i: int, spec: LimitSpec = RATE) -> LimitAcquire:
    return LimitAcquire(id=f"r{i}/a/1", limit="llm", key="acme", run_id=f"r{i}", spec=spec, requested_ms=T0)


def test_a_turn_grants_what_fits_and_marks_the_key_for_the_transaction():
    shard = Shard(0, producer=None)
    shard.apply("llm/acme", acquire(1), T0)
    shard.apply("llm/acme", acquire(2), T0)
    assert [g.run_id for g in shard.grants] == ["r1"] and shard.dirty == {"llm/acme"}
    assert shard.next_due_ms(T0) == T0 + 1000 + 1


def test_a_tick_grants_the_waiter_its_rate_admits_once_time_has_passed():
    shard = Shard(0, producer=None)
    shard.apply("llm/acme", acquire(1), T0)
    shard.apply("llm/acme", acquire(2), T0)
    shard.grants, shard.dirty = [], set()
    shard.tick(T0 + 500)
    assert shard.grants == [] and shard.dirty == set()  # nothing due: no transaction
    shard.tick(T0 + 1001)
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
