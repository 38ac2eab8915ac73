"""Activity handlers for the end-to-end tests (loaded by the `legato worker` subprocess).

They only use the public handler API (``@activity``, ``Result``, ``ActivityError``, ``progress``, ``heartbeat``).
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from legato.handlers import heartbeat, progress
from legato.handlers.registry import ActivityError, RateLimited, Result, activity

# Attempts seen per key (the test passes its run_id in the input: handlers never see the request itself).
_FLAKY_ATTEMPTS: dict[str, int] = {}


@activity("e2e_echo")
async def e2e_echo(data: Any) -> Any:
    """Return the input unchanged."""
    return data


@activity("e2e_stream")
async def e2e_stream(data: dict[str, Any]) -> dict[str, Any]:
    """Report ``chunks`` progress chunks ``{"i": i}`` (with ``"text"`` of ``chunk_bytes`` characters when asked),
    ``interval`` seconds apart, then return ``{"chunks": n}``."""
    n = int(data.get("chunks", 3))
    size = int(data.get("chunk_bytes", 0))
    for i in range(n):
        await progress({"i": i, "text": chr(97 + i % 26) * size} if size else {"i": i})
        await asyncio.sleep(float(data.get("interval", 0.05)))
    return {"chunks": n}


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


@activity("e2e_until_fixed")
async def e2e_until_fixed(data: dict[str, Any]) -> dict[str, Any]:
    """Fail non-retryably until the file ``data['fixed']`` exists: a test "fixes the worker" by creating it."""
    if not Path(str(data["fixed"])).exists():
        raise ActivityError("the worker is broken until it is fixed", type="E2EBroken", retryable=False)
    return {"fixed": True}


@activity("e2e_fatal")
async def e2e_fatal(data: Any) -> Any:
    """Always fail with a non-retryable error."""
    raise ActivityError("the e2e handler refuses", type="E2EFatal", retryable=False)


# --- handlers for tests/integration/test_semantics.py -------------------------------------------
# The worker is its own process: these record what they saw in memory, keyed by ``data['key']`` (the test
# passes a fresh key), and `e2e_probe` returns the records through a run (sem_probe), so tests read them
# through Kafka like everything else.

import random as _random
import time as _time


_CALLS: dict[str, int] = {}
_EVENTS: dict[str, list[str]] = {}
_STARTS: dict[str, list[float]] = {}
_BATCHES: dict[str, list[int]] = {}
_INFLIGHT: dict[str, int] = {}
_MAX_INFLIGHT: dict[str, int] = {}


def _note(key: str, what: str) -> None:
    _EVENTS.setdefault(key, []).append(what)


@activity("e2e_tracked")
async def e2e_tracked(data: dict[str, Any]) -> Result:
    """Sleep ``seconds``; record start/done/cancelled of ``tag`` under ``key``; fail when ``fail`` is set."""
    key, tag = str(data["key"]), str(data.get("tag"))
    _note(key, f"start:{tag}")
    try:
        await asyncio.sleep(float(data.get("seconds", 0)))
    except asyncio.CancelledError:
        _note(key, f"cancelled:{tag}")
        raise
    if data.get("fail"):
        _note(key, f"failed:{tag}")
        raise ActivityError(f"branch {tag} fails", type=str(data.get("error_type", "E2EBranchFailed")), retryable=False)
    _note(key, f"done:{tag}")
    return Result({"tag": tag}, confidence=0.9, cost={"usd": 0.001, "model": "e2e"})


@activity("e2e_counted")
async def e2e_counted(data: dict[str, Any]) -> Result:
    """Count calls per ``key``; return the value with the call number and a cost."""
    key = str(data["key"])
    _CALLS[key] = _CALLS.get(key, 0) + 1
    return Result({"value": data.get("value"), "call": _CALLS[key]}, confidence=0.8, cost={"usd": 0.01, "tokens_in": 100, "tokens_out": 10, "model": "e2e-big"})


@activity("e2e_item")
async def e2e_item(data: dict[str, Any]) -> dict[str, Any]:
    """A map item: random short sleep (so items finish out of order); tracks how many run at once per ``key``."""
    key = str(data["key"])
    _INFLIGHT[key] = _INFLIGHT.get(key, 0) + 1
    _MAX_INFLIGHT[key] = max(_MAX_INFLIGHT.get(key, 0), _INFLIGHT[key])
    try:
        await asyncio.sleep(_random.uniform(0.0, 0.03))
    finally:
        _INFLIGHT[key] -= 1
    return {"i": data["i"], "square": int(data["i"]) ** 2}


@activity("e2e_rate")
async def e2e_rate(data: dict[str, Any]) -> dict[str, Any]:
    """Record the start time (epoch seconds) per ``key``."""
    _STARTS.setdefault(str(data["key"]), []).append(_time.time())
    return {"i": data.get("i")}


@activity("e2e_batch", batched=True)
async def e2e_batch(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch handler: records the size of every call per ``key`` and doubles each ``i``."""
    for key in {str(item["key"]) for item in items}:
        _BATCHES.setdefault(key, []).append(len(items))
    await asyncio.sleep(0.02)
    return [{"i": item["i"], "doubled": int(item["i"]) * 2} for item in items]


@activity("e2e_fail_as")
async def e2e_fail_as(data: dict[str, Any]) -> Any:
    """Always fail with error ``type`` (``retryable`` default true); counts attempts per ``key``."""
    key = str(data["key"])
    _CALLS[key] = _CALLS.get(key, 0) + 1
    raise ActivityError(f"attempt {_CALLS[key]} of {key} fails", type=str(data.get("type", "E2EFailure")), retryable=bool(data.get("retryable", True)))


@activity("e2e_cost")
async def e2e_cost(data: dict[str, Any]) -> Result:
    """Return ``n`` with a cost of ``usd`` and ``tokens`` (tokens_in)."""
    return Result({"n": data.get("n")}, confidence=0.9, cost={"usd": float(data.get("usd", 0)), "tokens_in": int(data.get("tokens", 0)), "model": str(data.get("model", "e2e-model"))})


@activity("e2e_big")
async def e2e_big(data: dict[str, Any]) -> dict[str, Any]:
    """An output of about ``bytes`` bytes."""
    return {"blob": "x" * int(data["bytes"])}


@activity("e2e_probe")
async def e2e_probe(data: dict[str, Any]) -> dict[str, Any]:
    """What the handlers above recorded under ``key``."""
    key = str(data["key"])
    return {
        "calls": _CALLS.get(key, 0),
        "events": _EVENTS.get(key, []),
        "starts": _STARTS.get(key, []),
        "batches": _BATCHES.get(key, []),
        "max_inflight": _MAX_INFLIGHT.get(key, 0),
    }


@activity("e2e_single", concurrency=1)
async def e2e_single(data: dict[str, Any]) -> dict[str, Any]:
    """One request at a time per worker process: sleep ``seconds`` (a queue forms behind a slow one)."""
    seconds = float(data.get("seconds", 0))
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@activity("e2e_beating")
async def e2e_beating(data: dict[str, Any]) -> dict[str, Any]:
    """Work ``seconds`` in 100 ms slices, with a heartbeat after each unless ``silent``: a silent one hangs as far as
    the coordinator can tell."""
    slices = round(float(data.get("seconds", 1)) / 0.1)
    for _ in range(slices):
        await asyncio.sleep(0.1)
        if not data.get("silent"):
            await heartbeat()
    return {"slices": slices}


@activity("e2e_rate_limited")
async def e2e_rate_limited(data: dict[str, Any]) -> dict[str, Any]:
    """Refused for a rate limit (``retry_after`` seconds) on the first attempt for each ``data['run_id']``."""
    key = str(data["run_id"])
    _FLAKY_ATTEMPTS[key] = _FLAKY_ATTEMPTS.get(key, 0) + 1
    if _FLAKY_ATTEMPTS[key] == 1:
        raise RateLimited("429 from the model API", retry_after=float(data["retry_after"]))
    return {"attempts": _FLAKY_ATTEMPTS[key]}


@activity("e2e_huge")
async def e2e_huge(data: dict[str, Any]) -> dict[str, Any]:
    """Return a text of ``bytes`` characters: an output past a Kafka record's limit."""
    return {"text": "x" * int(data["bytes"])}


@activity("e2e_part")
async def e2e_part(data: dict[str, Any]) -> dict[str, Any]:
    """One branch of e2e_payloads: ``bytes`` characters, a letter of its own per item."""
    return {"i": data["i"], "text": chr(65 + data["i"] % 26) * int(data["bytes"])}


@activity("e2e_measure")
async def e2e_measure(data: dict[str, Any]) -> dict[str, Any]:
    """What this handler received (its input's references resolved by the worker): sizes and first letters."""
    def describe(value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("text"), str):
            return {"chars": len(value["text"]), "first": value["text"][:1]}
        if isinstance(value, list):
            return [describe(v) for v in value]
        if isinstance(value, str):
            return {"chars": len(value), "first": value[:1]}
        return value
    return {k: describe(v) for k, v in data.items()}
