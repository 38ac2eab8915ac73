"""Worker rate limits: each declared rate holds, also when one activity's requests carry different rates.

The buckets run on a virtual clock: a sleep advances it by exactly what was asked, so every start time is known
and the test takes no wall-clock time."""
import asyncio
import math

import pytest

from legato.streams.worker_support import RateLimits


class VirtualClock:
    """Whole microseconds, rounded up, like a real clock's resolution: a sleep always moves time on (a float sleep
    of 1e-17 s added to 0.5 s would not, and a bucket a hair short of one token would wait forever)."""

    def __init__(self) -> None:
        self.us = 0
        self.sleeps: list[float] = []

    @property
    def now(self) -> float:
        return self.us / 1e6

    def advance(self, seconds: float) -> None:
        self.us += math.ceil(seconds * 1e6)

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)


def waits(clock: VirtualClock) -> list[float]:
    """The sleeps the bucket asked for, without those of a float remainder (a few nanoseconds)."""
    return [s for s in clock.sleeps if s >= 1e-6]


async def test_a_rate_holds_when_the_activity_also_gets_requests_with_another_rate():
    clock = VirtualClock()
    limits = RateLimits(clock, clock.sleep)
    slow, fast = [], []
    for _ in range(40):  # e.g. one activity, a small and a large model, each step with its own rate
        await limits.take("llm", 20.0)
        slow.append(clock.now)
        await limits.take("llm", 50.0)
        fast.append(clock.now)
    # 20/s: a burst of 20 at once, then one every 1/20 s; the 40 at 50/s fit in their own burst and never wait
    assert slow == pytest.approx([0.0] * 20 + [(i + 1) / 20 for i in range(20)], abs=1e-5)
    assert fast == slow
    assert clock.now == pytest.approx(1.0, abs=1e-5)


async def test_one_rate_allows_its_burst_then_its_rate():
    clock = VirtualClock()
    limits = RateLimits(clock, clock.sleep)
    starts = []
    for _ in range(15):
        await limits.take("a", 10.0)
        starts.append(clock.now)
    # the burst (one second's worth) at once, then one every 0.1 s
    assert starts == pytest.approx([0.0] * 10 + [0.1, 0.2, 0.3, 0.4, 0.5], abs=1e-5)
    assert waits(clock) == pytest.approx([0.1] * 5, abs=1e-5)


async def test_time_refills_the_bucket_up_to_its_burst():
    clock = VirtualClock()
    limits = RateLimits(clock, clock.sleep)
    for _ in range(5):
        await limits.take("a", 5.0)
    clock.advance(100.0)  # idle for long: the bucket holds one second's worth again, not more
    for _ in range(5):
        await limits.take("a", 5.0)
    assert waits(clock) == []
    await limits.take("a", 5.0)
    assert waits(clock) == pytest.approx([0.2], abs=1e-5)

