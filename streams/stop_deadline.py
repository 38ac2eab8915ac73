"""A stopping worker exits by a deadline, even when a library's stop hangs.

A worker's stop is two phases (streams/app.py): the drain (``Workers.drain``: running handlers finish, their
completions are delivered, what was answered is committed), then faust's own stop (leave the group, stop the consumer
thread, the producer). Only the drain matters for correctness: once it has committed, nothing this process holds is
lost by leaving at once, and the group coordinator moves its partitions after the session timeout at worst. faust's
stop can hang when it meets a rebalance in progress; an orchestrator would SIGKILL the process at the end of its grace
period, long after. So the deadline is armed at the signal (drain plus margin) and again when the drain ends (the
stop's own budget); when it passes, the process writes every thread's stack to stderr (where it hung) and exits.

The timer runs on a thread, not the event loop: a loop that is stuck must not stop it.
"""
from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import sys
import threading
import traceback
from typing import Callable

log = logging.getLogger("legato.worker")


class StopDeadline:
    def __init__(self, exit: Callable[[int], None] = os._exit, dump: Callable[[], None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self._exit = exit
        self._dump = dump if dump is not None else (lambda: _dump_stacks(loop))
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self.fired: str | None = None  # why it fired, once it has

    def arm(self, seconds: float, after: str, code: int) -> None:
        """Exit with ``code`` unless the process has ended ``seconds`` from now (replaces any earlier deadline)."""
        timer = threading.Timer(seconds, self._fire, args=(seconds, after, code))
        timer.daemon = True  # a process that ends normally does not wait for it
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = timer
        timer.start()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _fire(self, seconds: float, after: str, code: int) -> None:
        self.fired = after
        log.error("still running %g s after %s: exiting with code %d; every thread's stack follows", seconds, after, code)
        try:
            self._dump()
        finally:
            for handler in logging.getLogger().handlers:
                try:
                    handler.flush()
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass
            self._exit(code)


def _dump_stacks(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Every thread's stack, then (a stuck loop shows only its select()) every task of ``loop`` with what it awaits."""
    try:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):  # a stderr with no file descriptor (captured, redirected)
        for ident, frame in sys._current_frames().items():
            print(f"Thread {ident:#x}:", file=sys.stderr)
            traceback.print_stack(frame, file=sys.stderr)
    if loop is not None:
        for _ in range(3):  # read from another thread: the task set may change under us
            try:
                tasks = list(asyncio.all_tasks(loop))
                break
            except RuntimeError:
                continue
        else:
            tasks = []
        for task in tasks:
            try:
                task.print_stack(limit=8, file=sys.stderr)
            except Exception:  # noqa: BLE001 - best effort while exiting
                pass
    sys.stderr.flush()
