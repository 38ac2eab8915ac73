"""Activities of `legato chaos` (tools/chaos_data; loaded by the worker subprocesses)."""
import asyncio
import os

from legato.handlers.registry import activity

DELAY = float(os.environ.get("CHAOS_DELAY", "0.005"))


@activity("chaos_echo", concurrency=64)
async def chaos_echo(data):
    await asyncio.sleep(DELAY)
    return data


@activity("chaos_slow", concurrency=64)
async def chaos_slow(data):
    await asyncio.sleep(float(data.get("seconds", 1)))
    return {"tag": data.get("tag"), "slept": data.get("seconds")}


@activity("chaos_raise")
async def chaos_raise(data):
    raise RuntimeError("chaos handler raised on purpose")


@activity("chaos_hang")
async def chaos_hang(data):
    await asyncio.sleep(3600)


@activity("chaos_unserializable")
async def chaos_unserializable(data):
    return {"value": object()}
