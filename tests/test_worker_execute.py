"""``streams.worker.execute``: every outcome of a handler call becomes a completion, a timeout included."""
from __future__ import annotations

import asyncio
import time

from legato.handlers.registry import Activity
from legato.streams.worker import execute, max_completion_bytes
from legato.topics import codec
from legato.topics.models import ActivityRequested


def _request(deadline_s: float | None) -> ActivityRequested:
    deadline = None if deadline_s is None else int((time.time() + deadline_s) * 1000)
    return ActivityRequested(request_id="r/a/1", run_id="r", step_id="a", activity="a", attempt=1, input={}, deadline=deadline)


async def _own_timeout(_):
    raise TimeoutError("upstream model call timed out")


async def _slow(_):
    await asyncio.sleep(5)


async def _fast(payload):
    return {"ok": True}


def test_a_handler_past_its_deadline_fails_with_activity_timeout():
    done = asyncio.run(execute(Activity(name="a", fn=_slow), _request(0.05)))
    assert done.status == "failed" and done.error.type == "ActivityTimeout" and done.error.retryable


def test_a_handlers_own_timeout_is_its_error_not_the_deadline_with_or_without_one():
    for deadline_s in (None, 30.0):  # without a deadline this raised TypeError and the request was acked with no completion
        done = asyncio.run(execute(Activity(name="a", fn=_own_timeout), _request(deadline_s)))
        assert done.status == "failed" and done.error.type == "TimeoutError", done
        assert "upstream model call timed out" in done.error.message and done.error.retryable


def test_a_handler_within_its_deadline_succeeds():
    done = asyncio.run(execute(Activity(name="a", fn=_fast), _request(30.0)))
    assert done.status == "succeeded" and done.output == {"ok": True}


def test_a_rate_limited_handler_reports_the_delay_it_was_given():
    from legato.handlers.registry import RateLimited

    async def refused(_):
        raise RateLimited("429 from the model API", retry_after=2.5)

    async def refused_bare(_):
        raise RateLimited()

    done = asyncio.run(execute(Activity(name="a", fn=refused), _request(30.0)))
    assert done.status == "failed" and (done.error.type, done.error.retry_after_ms, done.error.retryable) == ("RateLimited", 2500, True)
    assert "429" in done.error.message
    bare = asyncio.run(execute(Activity(name="a", fn=refused_bare), _request(30.0)))
    assert (bare.error.type, bare.error.retry_after_ms) == ("RateLimited", None)


def test_a_negative_retry_after_is_refused_where_it_is_raised():
    import pytest

    from legato.handlers.registry import RateLimited

    with pytest.raises(ValueError, match="retry_after must be >= 0"):
        RateLimited(retry_after=-1)


def test_an_output_too_large_for_a_record_fails_at_once_naming_its_size_and_the_limit():
    # given a handler that returns 20 MB
    async def _huge(_):
        return {"text": "x" * 20_000_000}

    # when it runs with plenty of time before its deadline
    started = time.perf_counter()
    done = asyncio.run(execute(Activity(name="a", fn=_huge), _request(30)))
    # then its step fails at once, not retryable, with the size and the limit in the message
    assert time.perf_counter() - started < 5
    assert done.status == "failed" and done.output is None
    assert done.error.type == "OutputTooLarge" and done.error.retryable is False
    assert "20,000,011 bytes" in done.error.message and f"{max_completion_bytes(1_000_000):,} bytes" in done.error.message


def test_an_output_just_under_the_limit_is_sent_and_one_just_over_is_refused():
    limit = max_completion_bytes(1_000_000)
    assert limit == 1_000_000 - 1024  # faust's producer limit is the smaller one, under the run document's 1 MiB - 8 KiB

    def _of(n: int):
        async def _handler(_):
            return "y" * n
        return Activity(name="a", fn=_handler)

    overhead = len(codec.dumps(asyncio.run(execute(_of(0), _request(30)))))
    fits = asyncio.run(execute(_of(limit - overhead), _request(30)))
    assert fits.status == "succeeded" and len(codec.dumps(fits)) == limit
    over = asyncio.run(execute(_of(limit - overhead + 1), _request(30)))
    assert over.status == "failed" and over.error.type == "OutputTooLarge"
