"""Partial results of a running activity: ``await progress(chunk)`` from inside a handler.

The worker running the handler sends each chunk to ``legato.progress`` as a ``ProgressReported`` record (numbered
from 0 within the request) as soon as it is reported, and before the step's completion; chunks never enter the
run's state. Outside a worker (a handler called in a unit test), and in ``batched=True`` handlers (one call serves
many requests), ``progress`` does nothing. A chunk is any JSON value, e.g. the tokens of an LLM answer::

    @activity("write_reply")
    async def write_reply(data):
        text = ""
        async for token in llm.stream(data["prompt"]):
            text += token
            await progress(token)
        return {"text": text}
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Awaitable, Callable, Iterator

Reporter = Callable[[Any], Awaitable[None]]

_reporter: ContextVar[Reporter | None] = ContextVar("legato_progress_reporter", default=None)


async def progress(chunk: Any) -> None:
    """Report a partial result of the activity this handler is running (a JSON value)."""
    report = _reporter.get()
    if report is not None:
        await report(chunk)


@contextmanager
def reporting(report: Reporter | None) -> Iterator[None]:
    """Within this block (and the tasks it starts), ``progress`` calls ``report`` (None: does nothing)."""
    token = _reporter.set(report)
    try:
        yield
    finally:
        _reporter.reset(token)
