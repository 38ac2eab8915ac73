"""``legato bench latency``: where a step's time goes, hop by hop, one run at a time.

Four pipes carry the same chain of no-op steps, measured in the same run:

- the raw pipe (the floor of this stack: a stateless aiokafka consumer turns each completion into the next request),
- Legato's coordinator with an independent aiokafka worker (nothing but the topic contract), every request in its
  batch's transaction (``LEGATO_EARLY_REQUESTS=0``: the baseline of the early requests),
- the same with requests caused by completions sent ahead of the transaction (the default),
- Legato's coordinator with Legato's own faust worker (``legato worker``).

The hops come from wall-clock timestamps (one machine, one clock): the measuring worker's own (completion sent,
request fetched), the coordinator's ``LEGATO_TRACE_FILE`` (a line per committed batch: polled, decided, records
handed to the producer, offsets added, records acknowledged, committed, and the request ids it produced), and the
bench handler's ``LEGATO_BENCH_TRACE`` (handler start and end in the faust worker).
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from legato.streams import security
from legato.tools.bench import ACTIVITY, Bench, Coordinators, Report, Row, _assigned_pipe, _done, _percentile, _progress, raw_pipe
from legato.topics.client import LegatoClient
from legato.topics.names import Topics

HOPS = [("completion → coordinator polled", "done", "polled"), ("polled → deciding starts", "polled", "deciding"), ("deciding → decided", "deciding", "decided"),
        ("decided → records handed to producer", "decided", "sent"), ("→ offsets added to the transaction", "sent", "offsets"),
        ("→ records acknowledged", "offsets", "acked"), ("→ transaction committed", "acked", "committed"),
        ("committed → worker has the request", "committed", "fetched")]
EARLY_HOPS = HOPS[:3] + [("decided → request handed to the early producer", "decided", "early"), ("early request → worker has it", "early", "fetched"),
                         ("(meanwhile) early request → transaction committed", "early", "committed")]
"""The hops of a request sent ahead of its batch's transaction (``LEGATO_EARLY_REQUESTS``, the default)."""


class TracingWorker:
    """Answers every request of the benchmark activity at once; records per request when it was fetched and when
    its completion was sent (wall clock)."""

    def __init__(self, bootstrap: str, topics: Topics):
        self.bootstrap, self.topics = bootstrap, topics
        self.fetched: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.received = 0
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.changed = asyncio.Event()

    async def run(self) -> None:
        consumer, producer = await _assigned_pipe(self.bootstrap, self.topics.requests(ACTIVITY), "bench-latency")
        try:
            self.ready.set()
            while not self.stop.is_set():
                batch = await consumer.getmany(timeout_ms=50)
                for records in batch.values():
                    for msg in records:
                        now = time.time()
                        req = orjson.loads(msg.value)
                        self.fetched[req["request_id"]] = now
                        self.received += 1
                        completion = {k: req[k] for k in ("request_id", "run_id", "step_id", "attempt")}
                        completion.update(status="succeeded", output=req.get("input"))
                        await producer.send(self.topics.completions, orjson.dumps(completion), key=req["run_id"].encode())
                        self.done[req["request_id"]] = time.time()
                        self.changed.set()
        finally:
            await consumer.stop()
            await producer.stop()


def _prev_request(request_id: str) -> str | None:
    """The request of the step before in the benchmark chain: ``<run>/s<i>/<attempt>`` → ``<run>/s<i-1>/1``."""
    run, step, _ = request_id.rsplit("/", 2)
    i = int(step[1:])
    return f"{run}/s{i - 1}/1" if i > 0 else None


def steady_hop_samples(leg: dict) -> list[dict[str, float]]:
    """The per-step hop samples of a traced ``Bench.steady`` leg: each request's batch hops, the previous step's
    completion sent (``done``) and the request fetched by the measuring worker (``fetched``)."""
    samples = []
    for rid, fetched in leg["fetched"].items():
        prev = _prev_request(rid)
        if prev in leg["done"] and rid in leg["batches"]:
            samples.append({**leg["batches"][rid], "done": leg["done"][prev], "fetched": fetched})
    return samples


def _read_trace(path: Path) -> dict[str, dict[str, float]]:
    """Coordinator trace: request id → the hops of the batch that produced it."""
    out: dict[str, dict[str, float]] = {}
    if not path.exists():
        return out
    for line in path.read_bytes().splitlines():
        rec = orjson.loads(line)
        per = rec.pop("per", {})
        for rid in rec.pop("requests"):
            out[rid] = {**rec, **per.get(rid, {})}
    return out


def _hop_rows(report: Report, label: str, samples: list[dict[str, float]], raw: list[float] | None, total: tuple[str, str, str],
             hops: list[tuple[str, str, str]]) -> list[float]:
    totals = [s[total[2]] - s[total[1]] for s in samples if total[1] in s and total[2] in s]
    early = [s for s in samples if "early" in s]
    groups = [("", [s for s in samples if "early" not in s], hops)]
    if early:
        groups.append((f"early ({len(early)} of {len(samples)}) ", early, [hops[0]] + EARLY_HOPS[1:]))
    for prefix, group, names in groups:
        for name, a, b in names:
            values = [s[b] - s[a] for s in group if a in s and b in s]
            if values:
                report.rows.append(Row(f"{label}: {prefix}{name}", f"{_percentile(values, 50) * 1000:.2f} / {_percentile(values, 99) * 1000:.2f} ms", "-", "-", "-", "-"))
    t50, t99 = _percentile(totals, 50) * 1000, _percentile(totals, 99) * 1000
    r50 = r99 = None
    if raw:
        r50, r99 = _percentile(raw, 50) * 1000, _percentile(raw, 99) * 1000
    report.rows.append(Row(f"{label}: overhead p50 ({total[0]})", f"{t50:.2f} ms", f"{r50:.2f} ms" if r50 else "-", f"{t50 / r50:.1f}" if r50 else "-", "≤ 5 ms",
                           "yes" if t50 <= 5 else "no"))
    report.rows.append(Row(f"{label}: overhead p99", f"{t99:.2f} ms", f"{r99:.2f} ms" if r99 else "-", f"{t99 / r99:.1f}" if r99 else "-", "≤ 25 ms",
                           "yes" if t99 <= 25 else "no"))
    return totals


async def _raw_once(b: Bench, topics: Topics, runs: int, steps: int) -> list[float]:
    worker = TracingWorker(b.settings.bootstrap, topics)
    stop, ready = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(worker.run()), asyncio.create_task(raw_pipe(b.settings.bootstrap, topics, steps, stop, ready))]
    await worker.ready.wait()
    await ready.wait()
    producer = AIOKafkaProducer(bootstrap_servers=b.settings.bootstrap, linger_ms=0, **security.aiokafka_kwargs())
    await producer.start()
    gaps: list[float] = []
    try:
        for i in range(runs):
            run_id = f"r{i}-{uuid.uuid4().hex[:6]}"
            first = {"request_id": f"{run_id}/s0/1", "run_id": run_id, "step_id": "s0", "activity": ACTIVITY, "attempt": 1, "input": {}}
            await producer.send_and_wait(topics.requests(ACTIVITY), orjson.dumps(first), key=run_id.encode())
            deadline = time.monotonic() + 30
            while f"{run_id}/s{steps - 1}/1" not in worker.done and time.monotonic() < deadline:
                worker.changed.clear()
                try:
                    await asyncio.wait_for(worker.changed.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
            _progress(f"raw pipe: run {i + 1}/{runs}")
            if i >= 2:  # the first runs warm connections up
                for s in range(1, steps):
                    rid, prev = f"{run_id}/s{s}/1", f"{run_id}/s{s - 1}/1"
                    if rid in worker.fetched and prev in worker.done:
                        gaps.append(worker.fetched[rid] - worker.done[prev])
        _done()
    finally:
        await producer.stop()
        worker.stop.set()
        stop.set()
        await asyncio.gather(*tasks)
    return gaps


async def _legato_runs(b: Bench, topics: Topics, runs: int, label: str) -> list[str]:
    run_ids = []
    async with LegatoClient(b.settings.bootstrap, topics.prefix, **security.aiokafka_kwargs()) as client:
        deadline = time.monotonic() + 120
        while True:  # the coordinator (and the worker) are up once a run completes
            try:
                await client.run("bench_one", {}, timeout=10)
                break
            except (asyncio.TimeoutError, RuntimeError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: no run completed within 120 s; logs in {b.workdir}")
        for i in range(runs):
            run_id = f"l{i}-{uuid.uuid4().hex[:6]}"
            event = await client.run("bench_sequential", {}, run_id=run_id, timeout=60)
            if event.status != "succeeded":
                raise RuntimeError(f"{label}: run {run_id} ended {event.status}: {event.error}")
            _progress(f"{label}: run {i + 1}/{runs}")
            if i >= 2:
                run_ids.append(run_id)
        _done()
    return run_ids


def _independent(b: Bench, runs: int, steps: int, early: bool = True) -> list[dict[str, float]]:
    topics = b.topics("li" if early else "lt")
    trace = b.workdir / f"trace-{topics.prefix}.jsonl"
    procs = Coordinators(b.settings, topics.prefix, b.workdir, {"LEGATO_TRACE_FILE": str(trace), "LEGATO_EARLY_REQUESTS": "1" if early else "0"})
    procs.start(1)

    async def go() -> tuple[TracingWorker, list[str]]:
        worker = TracingWorker(b.settings.bootstrap, topics)
        task = asyncio.create_task(worker.run())
        await worker.ready.wait()
        try:
            return worker, await _legato_runs(b, topics, runs, "legato + independent worker")
        finally:
            worker.stop.set()
            await task

    try:
        worker, run_ids = asyncio.run(go())
    finally:
        procs.stop()
    batches = _read_trace(trace)
    samples = []
    for run_id in run_ids:
        for s in range(1, steps):
            rid = f"{run_id}/s{s}/1"
            prev = _prev_request(rid)
            if rid in worker.fetched and prev in worker.done and rid in batches:
                samples.append({**batches[rid], "done": worker.done[prev], "fetched": worker.fetched[rid]})
    return samples


def _own_worker(b: Bench, runs: int, steps: int) -> list[dict[str, float]]:
    topics = b.topics("lo")
    trace = b.workdir / f"trace-{topics.prefix}.jsonl"
    handler_trace = b.workdir / f"handler-{topics.prefix}.txt"
    procs = Coordinators(b.settings, topics.prefix, b.workdir, {"LEGATO_TRACE_FILE": str(trace), "LEGATO_BENCH_TRACE": str(handler_trace)})
    procs.start(1)
    procs.start(1, handlers="legato.tools.bench_handlers", role="worker")
    try:
        run_ids = asyncio.run(_legato_runs(b, topics, runs, "legato + own worker"))
    finally:
        procs.stop()
    batches = _read_trace(trace)
    handler: dict[str, tuple[float, float]] = {}
    for line in handler_trace.read_text().splitlines():
        rid, start, end = line.split()
        handler[rid] = (float(start), float(end))
    samples = []
    for run_id in run_ids:
        for s in range(1, steps):
            rid = f"{run_id}/s{s}/1"
            prev = _prev_request(rid)
            if rid in handler and prev in handler and rid in batches:
                samples.append({**batches[rid], "done": handler[prev][1], "fetched": handler[rid][0]})
    return samples


def bench_latency(b: Bench, runs: int, steps: int = 20) -> Report:
    report = Report(f"legato bench latency --runs {runs}")
    raw = asyncio.run(_raw_once(b, b.topics("lr"), runs, steps))
    transactional = _independent(b, runs, steps, early=False)
    independent = _independent(b, runs, steps)
    own = _own_worker(b, runs, steps)
    _hop_rows(report, "independent worker, every request in the transaction (LEGATO_EARLY_REQUESTS=0)", transactional, raw,
              ("completion sent → next request fetched", "done", "fetched"), HOPS)
    _hop_rows(report, "independent worker", independent, raw, ("completion sent → next request fetched", "done", "fetched"), HOPS)
    own_hops = [("handler end → coordinator polled", "done", "polled")] + HOPS[1:-1] + [("committed → next handler start", "committed", "fetched")]
    _hop_rows(report, "own worker", own, raw, ("handler end → next handler start", "done", "fetched"), own_hops)
    report.notes.append(f"{runs} runs of {steps} no-op steps, one run at a time (the first 2 runs of each pipe warm up and are not counted); "
                        f"{len(raw)} raw, {len(transactional)} + {len(independent)} independent-worker and {len(own)} own-worker steps. Each hop row is p50 / p99; "
                        "hops are wall-clock moments on one machine: the measuring worker's, the coordinator's LEGATO_TRACE_FILE and the bench handler's.")
    return report
