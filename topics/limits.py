"""Records of cluster-wide limits: what coordinators send the limiter on ``<prefix>.limits`` (keyed by
``<limit>/<key>``), and the grants it answers with on ``<prefix>.coordinator`` (keyed by the run_id).

An acquisition's ``id`` is the request id of the attempt it admits (``<run_id>/<step key>/<attempt>``) or
``run:<run_id>`` for a run waiting for its concurrency key: deterministic, so a record sent twice is recognised.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PRIORITY_DEFAULT = 3
"""A trigger's priority when it gives none; 1 is the lowest, 5 the highest."""


RUN_LIMIT_PREFIX = "run:"
"""A workflow's run concurrency is the limit ``run:<workflow>``; a run's acquisition id is ``run:<run_id>``."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class LimitSpec(_Record):
    """One limit's budget: each is optional, at least one is set (``workflows.model.Limit`` checks)."""

    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    concurrency: int | None = Field(default=None, ge=1)


class LimitAcquire(_Record):
    """A coordinator wants to send a request (or start a run) that ``limit`` for ``key`` admits."""

    type: Literal["limit.acquire"] = "limit.acquire"
    id: str = Field(min_length=1)
    limit: str = Field(min_length=1)
    key: str = ""
    run_id: str = Field(min_length=1)  # where the grant goes
    priority: int = Field(default=PRIORITY_DEFAULT, ge=1, le=5)
    cost: int = Field(default=0, ge=0)  # tokens, estimated (``approx_tokens``)
    spec: LimitSpec
    requested_ms: int = 0


class LimitRelease(_Record):
    """An acquisition ended: its request completed, timed out or was cancelled (or it was never wanted: a grant for a
    run or attempt that no longer waits). ``cost``: the tokens it really used, when known; ``pause_ms``: the API
    answered 429, so the whole key waits that long."""

    type: Literal["limit.release"] = "limit.release"
    id: str = Field(min_length=1)
    limit: str = Field(min_length=1)
    key: str = ""
    cost: int | None = Field(default=None, ge=0)
    pause_ms: int | None = Field(default=None, ge=0)
    late: bool = False  # a grant given back unused because it came too late (asked for again at once)


class LimitGranted(_Record):
    """On the coordinator topic, keyed by ``run_id``: the acquisition ``id`` may go ahead."""

    type: Literal["limit.granted"] = "limit.granted"
    run_id: str
    id: str
    limit: str
    key: str = ""
    granted_ms: int
    waited_ms: int = 0


class TriggersDecided(_Record):
    """A coordinator process's marks, sent to every partition of ``<prefix>.limits`` a few times a second while a
    workflow with a ``concurrency`` key is deployed: on trigger partition ``p``, every trigger whose timestamp is
    before ``marks[p]`` has been decided (its acquisition, if any, committed before this record). The limiter grants
    a run concurrency key to a run only once every one of the ``partitions`` trigger partitions has passed its
    trigger time, so runs of one key start in trigger order even when a partition is decided late."""

    type: Literal["limit.triggers_decided"] = "limit.triggers_decided"
    partitions: int = Field(ge=1)  # of the triggers topic
    marks: dict[int, int]  # trigger partition → epoch ms


def limit_key(limit: str, key: str) -> str:
    """The record key of one limit's budget for one key on ``<prefix>.limits`` and the limiter's changelog."""
    return f"{limit}/{key}"
