"""tools/harness.kill_and_restart, the SIGKILL-and-restart step of the chaos scenarios, against a fake process and
a fake run watch (no processes, no real sleeps)."""
from __future__ import annotations

import random

from legato.tools import harness
from legato.tools.harness import Kill, kill_and_restart


class FakeProc:
    def __init__(self, log: list[str]):
        self.log = log

    def kill(self) -> float:
        self.log.append("kill")
        return 123.0

    def start(self) -> None:
        self.log.append("start")


class FakeWatch:
    """Runs finish as time passes: one per sleep of 0.1 s (the wait for a recovered process)."""

    def __init__(self, done: int):
        self.finished = done

    def done(self, run_ids: list[str]) -> int:
        return min(self.finished, len(run_ids))


async def test_kills_then_restarts_after_the_drawn_settle_and_down_times(monkeypatch):
    log: list[str] = []
    watch = FakeWatch(done=7)
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        log.append("sleep")

    monkeypatch.setattr(harness.asyncio, "sleep", sleep)
    rnd, twin = random.Random(5), random.Random(5)
    kill = await kill_and_restart(FakeProc(log), watch, [f"r{i}" for i in range(100)], rnd, None, settle=(0.5, 2.0))
    settle, down = twin.uniform(0.5, 2.0), twin.uniform(0.0, 2.0)
    assert slept == [settle, down] and log == ["sleep", "kill", "sleep", "start"]
    assert kill == Kill(at=123.0, done_before=7, down_s=down, resumed_at=7)


async def test_after_a_kill_it_waits_until_the_process_finished_runs_again(monkeypatch):
    log: list[str] = []
    watch = FakeWatch(done=10)
    polls = []

    async def sleep(s: float) -> None:
        if s == 0.1:  # polling the watch: the restarted process finishes one run per poll
            polls.append(s)
            watch.finished += 1

    monkeypatch.setattr(harness.asyncio, "sleep", sleep)
    previous = Kill(at=1.0, done_before=9, down_s=0.5, resumed_at=10)
    kill = await kill_and_restart(FakeProc(log), watch, [f"r{i}" for i in range(100)], random.Random(1), previous, recovered=5)
    assert len(polls) == 5 and kill.done_before == 15
    # all runs finished: no wait for more
    watch.finished, polls[:] = 100, []
    await kill_and_restart(FakeProc(log), watch, [f"r{i}" for i in range(100)], random.Random(1), Kill(1.0, 99, 0.5, 99))
    assert polls == []
