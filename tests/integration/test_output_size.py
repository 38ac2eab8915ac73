"""With no payload store (``LEGATO_PAYLOAD_STORE=none``) an output too large for a Kafka record fails its step at once
with ``OutputTooLarge`` naming its size (issue 27), instead of an ``ActivityTimeout`` after the step's timeout, and
the worker goes on serving other requests. With the store (the default), the same output travels by reference
(tests/integration/test_payloads.py)."""
from __future__ import annotations

import time

import pytest

from .conftest import _start

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_without_a_store_a_20_mb_output_fails_the_run_at_once_naming_its_size_and_the_worker_keeps_serving(legato):
    worker = _start("worker-no-store", ["worker", "--handlers", "tests.integration.inline_handlers", "--activity", "e2e_huge_inline"],
                    {**legato.env, "LEGATO_PAYLOAD_STORE": "none"}, legato.workdir)
    legato.services.append(worker)
    try:
        first = await legato.run("e2e_huge_inline", {"bytes": 1000}, timeout=120)  # the worker is up and has its partitions
        assert first.status == "succeeded" and first.output == {"text": "x" * 1000}, first
        started = time.monotonic()
        event = await legato.run("e2e_huge_inline", {"bytes": 20_000_000}, timeout=50)
        elapsed = time.monotonic() - started
        assert event.status == "failed", event
        assert event.error is not None and event.error.type == "OutputTooLarge", event.error
        assert "20,000,011 bytes" in event.error.message and "exceeds the limit of" in event.error.message, event.error.message
        assert elapsed < 30, f"the run took {elapsed:.1f}s: the step's timeout is 60s, a fail-fast is seconds"
        small = await legato.run("e2e_huge_inline", {"bytes": 1000}, timeout=30)
        assert small.status == "succeeded" and small.output == {"text": "x" * 1000}, small
        legato.assert_alive()
    finally:
        worker.stop()
        legato.services.remove(worker)
