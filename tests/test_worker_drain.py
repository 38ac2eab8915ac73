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
