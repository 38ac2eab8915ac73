"""Benchmark tracing (``LEGATO_TRACE_FILE``): the moments of every committed batch's hops, for ``legato bench latency``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from legato.streams.coordinator.batch import Batch


def request_id(value: bytes) -> str:
    return orjson.loads(value).get("request_id", "")


class Trace:
    """``LEGATO_TRACE_FILE``: one JSON line per committed batch with the wall-clock moments of its hops (polled,
    decided, records handed to the producer, offsets added, records acknowledged, committed), the ids of the
    requests it produced and, per request, the moments of its own record (polled, deciding, decided, handed to the
    early producer: a batch decided while the one before commits, or waiting for more, holds records polled at
    different moments); ``legato bench latency`` joins them with the records' own timestamps."""

    def __init__(self, path: Path):
        self._fh = open(path, "ab", buffering=0)

    def write(self, partition: int, batch: "Batch", polled: float) -> None:
        self._fh.write(orjson.dumps({"p": partition, "polled": polled, **batch.stamps, "requests": batch.requests, "per": batch.per}) + b"\n")

    def requests_decided(self, batch: "Batch", requested: list, polled: float, deciding: float) -> None:
        """The moments of the records that decided ``requested``: polled, their decision began and ended."""
        decided = time.time()
        for send in requested:
            batch.per[request_id(send[2])] = {"polled": polled, "deciding": deciding, "decided": decided}

    def sent_early(self, batch: "Batch", sent: list) -> None:
        """``sent``: early requests just handed to the early producer."""
        now = time.time()
        batch.stamps.setdefault("early", now)
        for _, _, value, _ in sent:
            batch.per.setdefault(request_id(value), {})["early"] = now

    def committed(self, partition: int, batch: "Batch", requests_prefix: str) -> None:
        """The batch's transaction committed: its line is written (``requests_prefix``: of the request topics)."""
        batch.stamps["committed"] = time.time()
        batch.requests = [request_id(v) for t, _, v, _ in batch.early + batch.sends if t.startswith(requests_prefix)]
        self.write(partition, batch, time.time() - (time.perf_counter() - batch.received))
