"""Activities of `legato chaos` (tools/chaos_data; loaded by the worker subprocesses)."""
import asyncio
import os

from legato.handlers.registry import activity

DELAY = float(os.environ.get("CHAOS_DELAY", "0.005"))


@activity("chaos_echo", concurrency=64)
async def chaos_echo(data):
    await asyncio.sleep(DELAY)
    return data


STARTS = os.environ.get("CHAOS_STARTS")
"""A file every ``chaos_slow`` start appends its tag to (``legato chaos worker``: how many handlers ran twice)."""


@activity("chaos_slow", concurrency=64)
async def chaos_slow(data):
    if STARTS:
        with open(STARTS, "a") as f:
            f.write(f"{data.get('tag')}\n")
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


_RATE_LIMITED: set[str] = set()  # tags refused once already (per worker process)


@activity("chaos_limited", concurrency=64)
async def chaos_limited(data):
    """Sleeps ``seconds``; appends its start and end (or its 429) as JSON lines to ``CHAOS_LIMITS_LOG`` when set, so
    tests and ``legato chaos/bench limits`` see when requests reached a worker. ``retry_after``: refused once per
    tag with ``RateLimited(retry_after=...)``."""
    import json
    import time

    from legato.handlers.registry import RateLimited

    path = os.environ.get("CHAOS_LIMITS_LOG")
    tag, key = data.get("tag"), data.get("key")

    def note(event, **extra):
        if path:
            line = json.dumps({"event": event, "tag": tag, "key": key, "t": time.time(), "pid": os.getpid(), **extra}) + "\n"
            with open(path, "a", encoding="utf-8") as out:
                out.write(line)

    note("start")
    if data.get("retry_after") is not None and tag not in _RATE_LIMITED:
        _RATE_LIMITED.add(tag)
        note("429")
        raise RateLimited("429 from the model API", retry_after=float(data["retry_after"]))
    await asyncio.sleep(float(data.get("seconds", 0)))
    note("end")
    return {"tag": tag}


@activity("chaos_blob", concurrency=16)
async def chaos_blob(data):
    """``chars`` characters of a letter chosen by ``n``: a value past Kafka's record limit (legato chaos payloads)."""
    await asyncio.sleep(DELAY)
    return {"n": data["n"], "text": chr(97 + data["n"] % 26) * int(data["chars"])}


@activity("chaos_digest", concurrency=16)
async def chaos_digest(data):
    """What arrived, its references resolved by the worker: the chars and sha256 of every text (legato chaos payloads)."""
    import hashlib

    texts = [data["big"]["text"], *(p["text"] for p in data["parts"])]
    return {"chars": sum(len(t) for t in texts), "sha256": hashlib.sha256("".join(texts).encode()).hexdigest()}
