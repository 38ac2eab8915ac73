"""Worker rate limits: each declared rate holds, also when one activity's requests carry different rates."""
import time

from legato.streams.worker_support import RateLimits


async def test_a_rate_holds_when_the_activity_also_gets_requests_with_another_rate():
    limits = RateLimits()
    started = time.monotonic()
    for _ in range(40):  # e.g. one activity, a small and a large model, each step with its own rate
        await limits.take("llm", 20.0)
        await limits.take("llm", 50.0)
    # 40 starts at 20/s with a burst of 20 take at least a second; the 40 at 50/s fit in their own burst
    assert time.monotonic() - started >= 0.95


async def test_one_rate_allows_its_burst_then_its_rate():
    limits = RateLimits()
    started = time.monotonic()
    for _ in range(10):
        await limits.take("a", 10.0)
    assert time.monotonic() - started < 0.2  # the burst: one second's worth
    for _ in range(5):
        await limits.take("a", 10.0)
    assert time.monotonic() - started >= 0.45
