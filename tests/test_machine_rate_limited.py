"""Given/when/then tables for attempts refused for a rate limit: error type ``RateLimited`` with ``retry_after_ms``
(``RateLimited(retry_after=…)`` in a Python handler, or an independent worker's completion) is retried after that
delay instead of the retry back-off; it counts as an attempt."""
from __future__ import annotations

from legato.topics.models import ActivityCompleted, ErrorInfo

from tests.machine_helpers import T0, Harness, machine_from

FLOW = """
name: limited
steps:
  - id: a
    activity: model_call
    timeout: 1m
    retry: {max_attempts: 3, backoff: 1s, multiplier: 2, max_backoff: 10s, jitter: true}
"""


def refused(h: Harness, now: int, retry_after_ms: int | None, error_type: str = "RateLimited") -> list:
    r = h.pending_for("a")
    error = ErrorInfo(type=error_type, message="429", retryable=True, retry_after_ms=retry_after_ms)
    return h.deliver(ActivityCompleted(request_id=r.request_id, run_id="r1", step_id="a", attempt=r.attempt, status="failed", error=error), now)


def test_a_rate_limited_attempt_is_retried_after_the_delay_the_api_asked_for():
    h = Harness(machine_from(FLOW))
    h.start("limited", now=T0)
    refused(h, T0 + 100, 30_000)
    # then the retry waits exactly 30 s (no back-off, no jitter), not the 1 s back-off
    assert h.state.steps["a"].status == "waiting_retry"
    assert h.state.timers["a:retry:1"].due_ms == T0 + 100 + 30_000
    h.fire("a:retry:1")
    assert h.pending_for("a").attempt == 2
    h.succeed("a", {"ok": 1}, now=T0 + 31_000)
    assert h.status == "succeeded"


def test_without_a_delay_or_with_another_error_type_the_back_off_applies():
    for retry_after_ms, error_type in ((None, "RateLimited"), (30_000, "Boom")):
        h = Harness(machine_from(FLOW))
        h.start("limited", now=T0)
        refused(h, T0, retry_after_ms, error_type)
        due = h.state.timers["a:retry:1"].due_ms - T0
        assert 800 <= due < 1_200, (error_type, due)  # 1 s back-off with a jitter in [0.8, 1.2)


def test_rate_limited_attempts_count_against_max_attempts():
    h = Harness(machine_from(FLOW))
    h.start("limited", now=T0)
    for attempt in (1, 2):
        refused(h, h.now + 10, 5_000)
        h.fire(f"a:retry:{attempt}")
    refused(h, h.now + 10, 5_000)
    assert h.status == "failed" and h.state.error.type == "RateLimited"
    assert h.state.steps["a"].error.retry_after_ms == 5_000


def test_a_rate_limited_attempt_is_final_when_the_step_says_so():
    h = Harness(machine_from(FLOW.replace("    timeout: 1m", "    timeout: 1m\n    non_retryable: [RateLimited]")))
    h.start("limited", now=T0)
    refused(h, T0, 1_000)
    assert h.status == "failed" and h.state.error.type == "RateLimited"
