"""An output too large for a Kafka record fails its step at once with ``OutputTooLarge`` (issue 27), instead of an
``ActivityTimeout`` after the step's timeout, and the worker goes on serving other requests."""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_20_mb_output_fails_the_run_at_once_naming_its_size_and_the_worker_keeps_serving(legato):
    started = time.monotonic()
    event = await legato.run("e2e_huge", {"bytes": 20_000_000}, timeout=50)
    elapsed = time.monotonic() - started
    assert event.status == "failed", event
    assert event.error is not None and event.error.type == "OutputTooLarge", event.error
    assert "20,000,011 bytes" in event.error.message and "exceeds the limit of" in event.error.message, event.error.message
    assert elapsed < 30, f"the run took {elapsed:.1f}s: the step's timeout is 60s, a fail-fast is seconds"
    # the same worker process answers the next requests, small and large
    small = await legato.run("e2e_huge", {"bytes": 1000}, timeout=30)
    assert small.status == "succeeded" and small.output == {"text": "x" * 1000}, small
    echoed = await legato.run("e2e_noop", {"after": "huge"}, timeout=30)
    assert echoed.status == "succeeded", echoed
    legato.assert_alive()
