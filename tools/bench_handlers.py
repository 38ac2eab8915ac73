"""The activity ``legato bench latency`` runs in Legato's own worker: answers at once and, when
``LEGATO_BENCH_TRACE`` names a file, appends ``request_id handler_start handler_end`` (wall-clock seconds)."""
from __future__ import annotations

import os
import time
from typing import Any

import importlib

_progress = importlib.import_module("legato.handlers.progress")
from legato.handlers.registry import activity

_TRACE = open(os.environ["LEGATO_BENCH_TRACE"], "a", buffering=1) if os.environ.get("LEGATO_BENCH_TRACE") else None


@activity("bench_noop", concurrency=64)
async def bench_noop(data: Any) -> Any:
    started = time.time()
    if _TRACE is not None:
        reporter = _progress._reporter.get()
        request = getattr(reporter, "request", None)
        _TRACE.write(f"{getattr(request, 'request_id', '?')} {started:.6f} {time.time():.6f}\n")
    return data
