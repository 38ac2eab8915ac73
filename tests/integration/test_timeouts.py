"""Activity deadlines on the real broker: ``run_timeout`` does not count the time a request waits in a worker's queue,
``timeout`` does; ``start_timeout`` fails a request no handler starts in time; ``heartbeat`` fails a handler that
goes silent. The handlers are ``e2e_single`` (one at a time per worker process) and ``e2e_beating``."""
from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest

from legato.topics.models import ActivityCompleted, ActivityHeartbeat, ActivityStarted

pytestmark = pytest.mark.integration

BURST = 100
BLOCK_S = 3.0


def new_run_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


async def block_the_slot(legato) -> str:
    """Trigger a 3 s request of ``e2e_single`` and wait until its handler holds the single slot (its worker's
    ``activity.started``: ``to_blocker`` sets a ``start_timeout``, so the worker reports it); its run_id."""
    blocker = await legato.trigger("to_blocker", {"seconds": BLOCK_S}, run_id=new_run_id("blocker"))
    for _ in range(300):
        if await legato.records_of(legato.topics.completions, ActivityStarted, blocker):
            return blocker
        await asyncio.sleep(0.1)
    raise AssertionError(f"the blocker {blocker} did not start within 30 s")


async def burst_behind_a_slow_request(legato, workflow: str) -> Counter:
    """Trigger a 3 s request of ``e2e_single``, then ``BURST`` runs of ``workflow`` whose handlers take 10 ms; the
    outcome of each run of the burst (``succeeded`` or its error type)."""
    blocker = await block_the_slot(legato)
    run_ids = {await legato.trigger(workflow, {"seconds": 0.01}, run_id=new_run_id(workflow)) for _ in range(BURST)}
    events = await legato.wait_for(run_ids | {blocker}, timeout=180)
    assert events[blocker].status == "succeeded", events[blocker]
    return Counter(events[r].status if events[r].status == "succeeded" else events[r].error.type for r in run_ids)


async def test_a_burst_queued_behind_a_slow_worker_succeeds_under_run_timeout_and_fails_under_timeout(legato):
    # given one worker slot held 3 s by a slow request, when 100 quick requests queue behind it with run_timeout: 1s
    # (and 2 min in all), then every one succeeds: queue time is not running time
    outcomes = await burst_behind_a_slow_request(legato, "to_run_timeout")
    assert outcomes == Counter({"succeeded": BURST}), outcomes
    # when the same burst has timeout: 1s (request to completion), the ones queued over 1 s fail by it
    outcomes = await burst_behind_a_slow_request(legato, "to_timeout")
    assert outcomes["ActivityTimeout"] >= BURST // 2, outcomes
    assert set(outcomes) <= {"succeeded", "ActivityTimeout"}, outcomes


async def test_the_worker_sends_activity_started_before_the_completion(legato):
    event = await legato.run("to_run_timeout", {"seconds": 0.01}, run_id=new_run_id("started"))
    assert event.status == "succeeded", event
    [started] = await legato.records_of(legato.topics.completions, ActivityStarted, event.run_id)
    assert (started.type, started.step_id, started.attempt, started.request_id) == ("activity.started", "quick", 1, f"{event.run_id}/quick/1")


async def test_a_request_that_no_handler_starts_in_time_fails_by_start_timeout(legato):
    blocker = await block_the_slot(legato)
    event = await legato.run("to_start_timeout", {"seconds": 0.01}, run_id=new_run_id("start"), timeout=60)
    assert event.status == "failed" and event.error.type == "ActivityStartTimeout", event
    assert event.duration_ms < BLOCK_S * 1000, "the run waited for the handler instead of its 1 s start_timeout"
    await legato.wait_for({blocker}, timeout=60)
    # the request was cancelled: its worker skipped it, so it never started
    assert await legato.records_of(legato.topics.completions, ActivityStarted, event.run_id) == []


async def test_a_handler_that_hangs_without_heartbeats_fails_by_heartbeat_timeout(legato):
    silent = await legato.run("to_heartbeat", {"seconds": 5, "silent": True}, run_id=new_run_id("silent"), timeout=60)
    assert silent.status == "failed" and silent.error.type == "ActivityHeartbeatTimeout", silent
    assert silent.duration_ms < 5000, "the run waited for the handler instead of its 1 s heartbeat"
    # a handler as long that beats every 100 ms (sent at most every 500 ms) succeeds
    beating = await legato.run("to_heartbeat", {"seconds": 2.5, "silent": False}, run_id=new_run_id("beating"), timeout=60)
    assert beating.status == "succeeded", beating
    beats = await legato.records_of(legato.topics.completions, ActivityHeartbeat, beating.run_id)
    assert 3 <= len(beats) <= 7, f"{len(beats)} heartbeats in 2.5 s, throttled to one per 500 ms"


async def test_a_rate_limited_attempt_is_retried_after_the_delay_the_handler_gave(legato):
    run_id = new_run_id("limited")
    event = await legato.run("to_rate_limited", {"run_id": run_id}, run_id=run_id, timeout=60)
    assert event.status == "succeeded" and event.output == {"attempts": 2}, event
    assert event.duration_ms < 30_000, "the retry waited for the 1 min back-off instead of the 300 ms retry_after"
    [refused] = [c for c in await legato.records_of(legato.topics.completions, ActivityCompleted, run_id) if c.status == "failed"]
    assert (refused.error.type, refused.error.retry_after_ms, refused.attempt) == ("RateLimited", 300, 1)
