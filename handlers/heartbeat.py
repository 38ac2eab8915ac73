"""Liveness of a long handler: ``await heartbeat()`` from inside it.

A step with ``heartbeat: 30s`` fails its attempt with ``ActivityHeartbeatTimeout`` when its started handler stays
silent for longer than that (docs/timeouts.md). The worker running the handler sends an ``activity.heartbeat``
record to ``legato.completions`` for a call, at most one per half the step's interval (calls in between cost
nothing), so a handler may call it as often as it likes::

    @activity("transcribe")
    async def transcribe(data):
        parts = []
        for chunk in split(data["audio"]):
            parts.append(await model.transcribe(chunk))
            await heartbeat()
        return {"text": " ".join(parts)}

Outside a worker (a handler called in a unit test), for a step without ``heartbeat``, and in ``batched=True``
handlers (one call serves many requests), ``heartbeat`` does nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Awaitable, Callable, Iterator

Beat = Callable[[], Awaitable[None]]

_beat: ContextVar[Beat | None] = ContextVar("legato_heartbeat", default=None)


async def heartbeat() -> None:
    """Tell the coordinator that the activity this handler runs is alive."""
    beat = _beat.get()
    if beat is not None:
        await beat()


@contextmanager
def beating(beat: Beat | None) -> Iterator[None]:
    """Within this block (and the tasks it starts), ``heartbeat`` calls ``beat`` (None: does nothing)."""
    token = _beat.set(beat)
    try:
        yield
    finally:
        _beat.reset(token)
