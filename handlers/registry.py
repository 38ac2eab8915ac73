"""Activity handlers: plain async functions registered with a decorator. They know nothing of Kafka."""
from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from pydantic import BaseModel

DEFAULT_CONCURRENCY = 16


@dataclass
class Result:
    """What a handler may return instead of a bare output: the output plus confidence and cost."""

    output: Any = None
    confidence: float | None = None
    cost: dict[str, Any] | None = None  # usd, tokens_in, tokens_out, model


class ActivityError(Exception):
    """Raise to fail a step with a chosen error type; ``retryable=False`` skips the retry policy."""

    def __init__(self, message: str, *, type: str | None = None, retryable: bool = True):
        super().__init__(message)
        self.type = type or self.__class__.__name__
        self.retryable = retryable


class RateLimited(ActivityError):
    """Raise when the API a handler calls refused for its rate limit (an HTTP 429): the attempt fails with error type
    ``RateLimited`` and, when ``retry_after`` (seconds, e.g. the response's ``Retry-After``) is given, the step's next
    attempt comes after that delay instead of its ``retry`` back-off (docs/timeouts.md). It counts as an attempt."""

    def __init__(self, message: str = "rate limited", *, retry_after: float | None = None):
        super().__init__(message, type="RateLimited", retryable=True)
        if retry_after is not None and retry_after < 0:
            raise ValueError(f"retry_after must be >= 0 seconds, got {retry_after!r}")
        self.retry_after = retry_after


@dataclass
class Activity:
    name: str
    fn: Callable[[Any], Awaitable[Any]]
    concurrency: int = DEFAULT_CONCURRENCY
    input_model: type[BaseModel] | None = None
    batched: bool = False  # the handler takes a list of inputs and returns a list of results

    async def __call__(self, payload: Any) -> Any:
        if self.input_model is not None:
            payload = [self.input_model.model_validate(p) for p in payload] if self.batched else self.input_model.model_validate(payload)
        return await self.fn(payload)


@dataclass
class Registry:
    activities: dict[str, Activity] = field(default_factory=dict)

    def add(self, act: Activity) -> None:
        existing = self.activities.get(act.name)
        if existing is not None and existing.fn is not act.fn:
            raise ValueError(f"activity {act.name!r} is registered twice ({existing.fn.__module__} and {act.fn.__module__})")
        self.activities[act.name] = act


REGISTRY = Registry()


def activity(name: str | None = None, *, concurrency: int = DEFAULT_CONCURRENCY, batched: bool = False):
    """Register an ``async def handler(input) -> output | Result`` as the activity ``name``.

    When the parameter is annotated with a pydantic model, the request input is validated into it.
    With ``batched=True`` the handler takes a list of inputs and returns a list of results in the same order;
    steps with ``batch: {max_size, max_wait}`` then share one call (one model call for many items).
    """

    def register(fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"activity {fn.__name__} must be an async function")
        params = list(inspect.signature(fn).parameters.values())
        model = None
        if params:
            hints = inspect.get_annotations(fn, eval_str=True)
            hint = hints.get(params[0].name)
            if batched and getattr(hint, "__origin__", None) is list and hint.__args__:
                hint = hint.__args__[0]
            if isinstance(hint, type) and issubclass(hint, BaseModel):
                model = hint
        REGISTRY.add(Activity(name or fn.__name__, fn, concurrency, model, batched))
        return fn

    return register


def load_handler_modules(modules: list[str]) -> dict[str, Activity]:
    """Import ``modules`` (from the working directory too) and return every registered activity.

    The working directory goes last on ``sys.path``: a user's module is found there, but never shadows an
    installed one (Legato itself lives under ``legato.*``, so a user's ``handlers/`` package never collides)."""
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    for module in modules:
        importlib.import_module(module)
    return dict(REGISTRY.activities)
