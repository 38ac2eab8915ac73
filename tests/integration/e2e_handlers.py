"""Activity handlers for the end-to-end tests (loaded by the `legato worker` subprocess).

They only use the public handler API (``@activity``, ``Result``, ``ActivityError``).
"""
from __future__ import annotations

import asyncio
from typing import Any

from handlers.registry import ActivityError, Result, activity

# Attempts seen per key (the test passes its run_id in the input: handlers never see the request itself).
_FLAKY_ATTEMPTS: dict[str, int] = {}


@activity("e2e_echo")
async def e2e_echo(data: Any) -> Any:
    """Return the input unchanged."""
    return data


@activity("e2e_add")
async def e2e_add(data: dict[str, Any]) -> dict[str, Any]:
    """{value, add} -> {value: value + add}."""
    return {"value": int(data["value"]) + int(data.get("add", 1))}


@activity("e2e_sleep")
async def e2e_sleep(data: dict[str, Any]) -> Result:
    """Sleep ``seconds`` then return ``{"tag": tag, "slept": seconds}`` with a small cost."""
    seconds = float(data.get("seconds", 0))
    await asyncio.sleep(seconds)
    return Result({"tag": data.get("tag"), "slept": seconds}, confidence=0.5, cost={"usd": 0.001, "model": "e2e"})


@activity("e2e_flaky")
async def e2e_flaky(data: dict[str, Any]) -> dict[str, Any]:
    """Fail (retryably) the first attempt for each ``data['run_id']``, succeed afterwards."""
    key = str(data["run_id"])
    _FLAKY_ATTEMPTS[key] = _FLAKY_ATTEMPTS.get(key, 0) + 1
    attempts = _FLAKY_ATTEMPTS[key]
    if attempts == 1:
        raise ActivityError(f"first attempt of {key} fails", type="E2ETransient", retryable=True)
    return {"attempts": attempts}


@activity("e2e_fatal")
async def e2e_fatal(data: Any) -> Any:
    """Always fail with a non-retryable error."""
    raise ActivityError("the e2e handler refuses", type="E2EFatal", retryable=False)
