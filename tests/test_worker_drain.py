"""``Workers.drain`` (a worker stopping on SIGTERM) without a broker: it waits for the handlers running, abandons those
still running at its timeout (cancelled, counted), ends rate-limit waits at once, and commits after them.
tests/integration/test_worker_drain.py stops a real worker."""
from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from legato.streams.metrics import Metrics
from legato.streams.worker import Workers


def _workers(metrics: Metrics | None = None) -> tuple[Workers, list[str]]:
    w = Workers.__new__(Workers)  # the drain's own state only: no faust app
    w.handling, w.draining, w._drain, w._waiting, w.drain_s, w.metrics = {}, False, None, set(), 30.0, metrics
    events: list[str] = []

    async def commit_answered(tps=None) -> None:
        events.append("commit")

    w.commit_answered = commit_answered  # type: ignore[method-assign]
    return w, events


def _handler(w: Workers, events: list[str], name: str, seconds: float, activity: str = "act") -> asyncio.Task:
    async def run() -> None:
        try:
            await asyncio.sleep(seconds)
            events.append(f"{name} finished")
        except asyncio.CancelledError:
            events.append(f"{name} cancelled")
            raise

    task = asyncio.ensure_future(run())
    w.handling[task] = activity
    task.add_done_callback(w._handled)
    return task


async def test_the_drain_waits_for_the_running_handlers_then_commits():
    w, events = _workers()
    _handler(w, events, "a", 0.2)
    _handler(w, events, "b", 0.1)
    assert await w.drain(5.0) == 0
    assert events == ["b finished", "a finished", "commit"]
    assert w.draining and not w.handling


async def test_a_handler_still_running_at_the_timeout_is_abandoned_and_counted():
    metrics = Metrics(CollectorRegistry())
    w, events = _workers(metrics)
    _handler(w, events, "quick", 0.05)
    slow = _handler(w, events, "slow", 60.0, activity="llm")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await w.drain(0.3) == 1
    assert loop.time() - t0 < 2.0
    assert slow.cancelled()
    assert events == ["quick finished", "slow cancelled", "commit"]
    assert metrics.activities_abandoned.labels("llm")._value.get() == 1


async def test_a_second_drain_is_the_first():
    w, events = _workers()
    _handler(w, events, "a", 0.1)
    assert await asyncio.gather(w.drain(5.0), w.drain(5.0)) == [0, 0]
    assert events.count("commit") == 1


async def test_a_rate_limit_wait_ends_when_the_drain_begins():
    w, events = _workers()
    waiting = asyncio.ensure_future(w._unless_draining(asyncio.sleep(60)))
    await asyncio.sleep(0.01)
    assert await asyncio.wait_for(w.drain(5.0), 2.0) == 0
    assert await waiting is False
    assert await w._unless_draining(asyncio.sleep(0)) is False  # once draining, no wait starts
    w.draining = False
    assert await w._unless_draining(asyncio.sleep(0)) is True


async def test_a_commit_that_never_returns_does_not_hold_the_drain_or_a_revocation():
    """A stopping worker's commit can wait on a rebalance that waits on the drain (faust runs both through its method
    queues): the drain and the revocation each give their commit ``commit_timeout_s``, then go on, saying so."""
    w, events = _workers()
    w.commit_timeout_s = 0.2
    w.offsets = type("Offsets", (), {"revoked": lambda self, tps: events.append(f"revoked {sorted(tps)}")})()

    async def never(tps=None) -> None:
        events.append("commit")
        await asyncio.Event().wait()

    w.commit_answered = never  # type: ignore[method-assign]
    _handler(w, events, "a", 0.05)
    assert await asyncio.wait_for(w.drain(5.0), 2.0) == 0
    assert w.drain_committed is False
    await asyncio.wait_for(w._on_revoked(None, {1}), 2.0)
    assert events == ["a finished", "commit", "commit", "revoked [1]"]


async def test_a_drain_that_committed_says_so():
    w, events = _workers()
    _handler(w, events, "a", 0.01)
    await w.drain(5.0)
    assert w.drain_committed is True


async def test_stop_drains_under_a_deadline_then_gives_the_rest_of_the_stop_its_own():
    w, events = _workers()
    w.stop_s = 7.0
    armed: list[tuple[float, str, int]] = []

    class Deadline:
        def __init__(self, loop=None):
            assert loop is asyncio.get_running_loop()

        def arm(self, seconds: float, after: str, code: int) -> None:
            armed.append((seconds, after.split(" ")[0], code))
            events.append("arm")

    w.stop_deadline = Deadline  # type: ignore[assignment]
    _handler(w, events, "a", 0.05)
    assert await w.stop() == 0
    # the first bound covers the drain's handlers, their cancellation and its commit, then the stop itself
    assert armed == [(30.0 + 5.0 + w.commit_timeout_s + 7.0, "SIGTERM", 1), (7.0, "its", 0)]
    assert events == ["arm", "a finished", "commit", "arm"]


async def test_a_refused_commit_is_not_taken_for_a_committed_drain():
    w, events = _workers()

    async def refused(tps=None) -> bool:
        events.append("commit")
        return False  # faust: "already rebalanced"

    w.commit_answered = refused  # type: ignore[method-assign]
    await w.drain(5.0)
    assert events == ["commit"] and w.drain_committed is False
