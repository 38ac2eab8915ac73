"""``StopDeadline``: a stopping worker exits by its deadline even when its event loop is stuck, and not before."""
from __future__ import annotations

import asyncio
import threading

from legato.streams.stop_deadline import StopDeadline, _dump_stacks


def _deadline():
    exited: list[int] = []
    done = threading.Event()

    def exit(code: int) -> None:
        exited.append(code)
        done.set()

    return StopDeadline(exit=exit, dump=lambda: None), exited, done


def test_it_exits_with_the_code_of_the_last_deadline_armed():
    d, exited, done = _deadline()
    d.arm(5.0, "SIGTERM", 1)
    d.arm(0.05, "the drain", 0)  # replaces the first
    assert done.wait(2.0)
    assert exited == [0] and d.fired == "the drain"
    assert not done.wait(0.1) or exited == [0]


def test_a_cancelled_deadline_never_fires():
    d, exited, done = _deadline()
    d.arm(0.05, "SIGTERM", 1)
    d.cancel()
    assert not done.wait(0.3)
    assert exited == [] and d.fired is None


def test_it_fires_while_the_event_loop_is_blocked():
    d, exited, done = _deadline()

    async def stuck() -> None:
        d.arm(0.05, "the drain", 0)
        done.wait(2.0)  # blocks the loop itself, as a hung stop would

    asyncio.run(stuck())
    assert exited == [0]


def test_the_dump_names_the_tasks_of_the_loop(capsys):
    async def main() -> None:
        async def hung_in_faust_stop() -> None:
            await asyncio.Event().wait()

        task = asyncio.ensure_future(hung_in_faust_stop())
        await asyncio.sleep(0)
        _dump_stacks(asyncio.get_running_loop())
        task.cancel()

    asyncio.run(main())
    err = capsys.readouterr().err
    assert "hung_in_faust_stop" in err and "Thread" in err
