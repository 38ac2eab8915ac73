"""What a worker sends while a handler runs: ``activity.started`` when the request asks, and heartbeats throttled to one
per half the step's interval. The send function and the clock are the test's (nothing here is about Kafka)."""
from __future__ import annotations

import asyncio

import orjson

from legato.handlers import heartbeat
from legato.handlers.heartbeat import beating
from legato.streams.worker import _Liveness
from legato.topics.models import ActivityRequested


def request(**kw) -> ActivityRequested:
    return ActivityRequested(request_id="r1/a/1", run_id="r1", step_id="a", activity="work", attempt=1, **kw)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(liveness_kw: dict, body):
    sent: list[tuple[bytes, dict]] = []

    async def send(key: bytes, value: bytes):
        sent.append((key, orjson.loads(value)))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    clock = Clock()

    async def main():
        liveness = _Liveness(send, request(**liveness_kw), clock)
        await liveness.started()
        with beating(liveness.beat):
            await body(clock)
        await liveness.delivered()

    asyncio.run(main())
    return sent


def test_the_started_record_goes_out_only_when_the_request_asks():
    async def nothing(clock):
        pass

    [(key, record)] = run({"report_started": True}, nothing)
    assert key == b"r1" and record["type"] == "activity.started"
    assert {k: record[k] for k in ("request_id", "run_id", "step_id", "attempt")} == {"request_id": "r1/a/1", "run_id": "r1", "step_id": "a", "attempt": 1}
    assert isinstance(record["started_ms"], int)
    assert run({}, nothing) == []


def test_heartbeats_are_throttled_to_one_per_half_interval():
    async def chatty(clock):
        for _ in range(10):  # ten calls within 4.5 s: the first goes, the rest wait for 5 s (half of 10 s)
            await heartbeat()
            clock.now += 0.5
        clock.now += 0.5  # 5 s after the first
        await heartbeat()
        await heartbeat()

    sent = run({"report_started": True, "heartbeat_ms": 10_000}, chatty)
    assert [r["type"] for _, r in sent] == ["activity.started", "activity.heartbeat", "activity.heartbeat"]
    assert all(isinstance(r["heartbeat_ms"], int) for _, r in sent[1:])


def test_heartbeat_does_nothing_when_the_step_sets_no_interval_or_outside_a_worker():
    async def calls(clock):
        await heartbeat()

    assert run({}, calls) == []
    asyncio.run(heartbeat())  # a handler called in a unit test: no worker, no error
