"""The limits' metrics (docs/limits.md): the limiter's decisions, made by the pure limiter, counted by
``Metrics.limit_decided``; the windowed gauges are recomputed when scraped (the clock is an argument)."""
from __future__ import annotations

from typing import Any

import pytest

from legato.streams import metrics as metrics_module
from legato.streams.metrics import LIMIT_KEYS, Metrics
from legato.topics.limits import LimitAcquire, LimitRelease, LimitSpec
from legato.workflows import limiter
from legato.workflows.limiter import KeyState

T0 = 1_700_000_000_000
SPEC = LimitSpec(requests_per_minute=600, tokens_per_minute=100_000, concurrency=2)


class Limiter:
    """The limiter's shell in miniature: one state per key, each decision counted."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.states: dict[tuple[str, str], KeyState | None] = {}
        self.now = T0
        metrics._limit_use.clock = lambda: self.now / 1000

    def send(self, record: Any, limit: str = "openai", key: str = "acme") -> list[Any]:
        state, grants = limiter.decide(self.states.get((limit, key)), record, self.now)
        self.states[(limit, key)] = state
        self.metrics.limit_decided(state, record, grants)
        return grants

    def acquire(self, id: str, key: str = "acme", cost: int = 100, limit: str = "openai", spec: LimitSpec = SPEC) -> list[Any]:
        return self.send(LimitAcquire(id=id, limit=limit, key=key, run_id=id, cost=cost, spec=spec, requested_ms=self.now), limit, key)

    def release(self, id: str, key: str = "acme", cost: int | None = None, pause_ms: int | None = None, limit: str = "openai") -> list[Any]:
        return self.send(LimitRelease(id=id, limit=limit, key=key, cost=cost, pause_ms=pause_ms), limit, key)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def test_grants_waits_use_and_the_limit_values(metrics):
    lim = Limiter(metrics)
    assert len(lim.acquire("a")) == 1 and len(lim.acquire("b")) == 1
    assert lim.acquire("c") == []  # concurrency 2: c waits
    lim.now += 1500
    grants = lim.release("a", cost=400)  # a's real tokens: 400, not the 100 estimated
    assert [g.id for g in grants] == ["c"]
    assert value(metrics, "legato_limit_grants_total", limit="openai") == 3
    assert value(metrics, "legato_limit_wait_seconds_count", limit="openai", key="acme") == 3
    assert value(metrics, "legato_limit_wait_seconds_sum", limit="openai", key="acme") == pytest.approx(1.5)
    assert value(metrics, "legato_limit_wait_seconds_bucket", limit="openai", key="acme", le="1.0") == 2
    assert value(metrics, "legato_limit_requests", limit="openai", key="acme") == 3
    assert value(metrics, "legato_limit_tokens", limit="openai", key="acme") == 400 + 100 + 100
    assert value(metrics, "legato_limit_concurrency_in_use", limit="openai", key="acme") == 2
    assert value(metrics, "legato_limit_waiting", limit="openai", key="acme") == 0
    assert value(metrics, "legato_limit_value", limit="openai", budget="requests_per_minute") == 600
    assert value(metrics, "legato_limit_value", limit="openai", budget="tokens_per_minute") == 100_000
    assert value(metrics, "legato_limit_value", limit="openai", budget="concurrency") == 2


def test_waiting_counts_and_the_window_slides(metrics):
    lim = Limiter(metrics)
    for i in range(4):
        lim.acquire(f"r{i}")
    assert value(metrics, "legato_limit_waiting", limit="openai", key="acme") == 2
    lim.now += 1_000  # past the rate's burst too
    lim.release("r0")
    lim.release("r1")
    lim.now += 29_000
    assert value(metrics, "legato_limit_requests", limit="openai", key="acme") == 4
    lim.release("r2")
    lim.release("r3")
    assert value(metrics, "legato_limit_requests", limit="openai", key="acme") == 4
    lim.now += 31_000  # every grant is older than a minute now; nothing held or waiting
    assert value(metrics, "legato_limit_requests", limit="openai", key="acme") is None
    assert value(metrics, "legato_limit_concurrency_in_use", limit="openai", key="acme") is None
    assert value(metrics, "legato_limit_value", limit="openai", budget="concurrency") is None
    assert value(metrics, "legato_limit_grants_total", limit="openai") == 4  # counters stay


def test_a_429_pause_is_counted_by_limit(metrics):
    lim = Limiter(metrics)
    lim.acquire("a")
    lim.acquire("b")
    lim.acquire("c")
    assert lim.release("a", pause_ms=5_000) == []  # c must wait for the pause although a place is free
    assert value(metrics, "legato_limit_pauses_total", limit="openai") == 1
    lim.release("b")  # a release without a pause counts none
    assert value(metrics, "legato_limit_pauses_total", limit="openai") == 1
    lim.now += 5_001
    assert [g.id for g in lim.send(None)] == ["c"]
    assert value(metrics, "legato_limit_wait_seconds_sum", limit="openai", key="acme") == pytest.approx(5.001)


def test_keys_beyond_the_cap_are_summed_as_other(metrics, monkeypatch):
    monkeypatch.setattr(metrics_module, "LIMIT_KEYS", 3)
    lim = Limiter(metrics)
    for i in range(5):
        lim.acquire(f"r{i}", key=f"tenant-{i}")
    for i in range(3):
        assert value(metrics, "legato_limit_concurrency_in_use", limit="openai", key=f"tenant-{i}") == 1
    assert value(metrics, "legato_limit_concurrency_in_use", limit="openai", key="tenant-3") is None
    assert value(metrics, "legato_limit_concurrency_in_use", limit="openai", key="other") == 2
    assert value(metrics, "legato_limit_requests", limit="openai", key="other") == 2
    assert value(metrics, "legato_limit_wait_seconds_count", limit="openai", key="other") == 2
    assert LIMIT_KEYS == 100


def test_dropped_keys_are_no_longer_reported(metrics):
    lim = Limiter(metrics)
    lim.acquire("a", key="acme")
    lim.acquire("b", key="globex")
    metrics.limits_dropped([("openai", "acme")])  # the key's partition went to another process
    assert value(metrics, "legato_limit_concurrency_in_use", limit="openai", key="acme") is None
    assert value(metrics, "legato_limit_concurrency_in_use", limit="openai", key="globex") == 1


def test_a_run_concurrency_key_is_a_limit_like_any_other(metrics):
    lim = Limiter(metrics)
    spec = LimitSpec(concurrency=1)
    lim.acquire("run:r1", limit="run:orders", key="customer-1", cost=0, spec=spec)
    lim.acquire("run:r2", limit="run:orders", key="customer-1", cost=0, spec=spec)
    assert value(metrics, "legato_limit_waiting", limit="run:orders", key="customer-1") == 1
    assert value(metrics, "legato_limit_value", limit="run:orders", budget="concurrency") == 1
    assert value(metrics, "legato_limit_value", limit="run:orders", budget="requests_per_minute") is None


def test_a_metrics_bug_never_raises(metrics):
    metrics.limit_decided(object(), None, [object()])  # logged, not raised


def test_the_limiter_shell_reports_its_decisions_once_committed_and_drops_its_keys_when_closed(metrics):
    from legato.streams.limiter import Shard

    shard = Shard(0, producer=None, metrics=metrics)
    metrics._limit_use.clock = lambda: T0 / 1000
    for i in range(3):
        shard.apply("openai/acme", LimitAcquire(id=f"r{i}", limit="openai", key="acme", run_id=f"r{i}", cost=10, spec=SPEC), T0)
    assert [g.id for g in shard.grants] == ["r0", "r1"]
    assert value(metrics, "legato_limit_grants_total", limit="openai") is None  # not before its transaction commits
    shard.committed(T0)
    assert shard.grants == [] and shard.decisions == []
    assert value(metrics, "legato_limit_grants_total", limit="openai") == 2
    assert value(metrics, "legato_limit_waiting", limit="openai", key="acme") == 1
    metrics.limits_dropped((s.limit, s.key) for s in shard.states.values())  # what Limiter._close does
    assert value(metrics, "legato_limit_waiting", limit="openai", key="acme") is None
