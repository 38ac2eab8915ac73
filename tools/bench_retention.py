"""``legato bench retention``: what forgetting finished runs buys the coordinator.

Three cases in one run, each on its own topics with one coordinator: N runs of a one-step no-op workflow, answered at
once by an independent measuring worker, until every one has finished —

- **retained** (the baseline): the workflow sets no ``retention``, so the runs stay in the run table (default 7 d);
- **forgotten**: ``retention: 1s``, so each finished run is forgotten a second later (a changelog tombstone), and the
  benchmark waits until ``legato_runs_forgotten_total`` counts every run;
- **forgotten, compacting changelog**: the same on a changelog whose segments roll every 10 s (``COMPACTING``), restored
  once the log cleaner has been over it.

Then it measures the coordinator's RSS, SIGKILLs it, starts a fresh one and measures the restore: from the new
process's start to its log saying that the last of its partitions is loaded (``partition N: K runs loaded in S s``,
logged by ``streams/coordinator/rebalance.py``), the sum of those per-partition load times, and the restored
process's RSS. What the restore had to read is counted by reading the changelog the same way (records, tombstones,
bytes), with the topic's cleanup settings and, on a local broker, its segment files and whether the log cleaner has
compacted it yet.
"""
from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from legato.streams import kafka_io, security
from legato.tools import kafka_local
from legato.tools.bench import ACTIVITY, Bench, Coordinators, MeasuringWorker, Report, Row, _done, _progress
from legato.tools.harness import free_port, metric_sum, scrape

WORKFLOW = "bench_retained"
CLEANUP_KEYS = ("cleanup.policy", "segment.bytes", "segment.ms", "min.cleanable.dirty.ratio", "delete.retention.ms", "min.compaction.lag.ms")
_LOADED = re.compile(r"^(\S+ \S+) INFO legato\.coordinator: partition (\d+): (\d+) runs loaded in ([\d.]+)s")


def _workflow(retention: str | None) -> str:
    lines = [f"name: {WORKFLOW}", "version: 1"] + ([f"retention: {retention}"] if retention else [])
    return "\n".join(lines + ["steps:", "  - id: s0", f"    activity: {ACTIVITY}", "    input: {i: 0}", "    timeout: 1h"]) + "\n"


@dataclass
class Case:
    label: str
    retention: str | None
    runs: int = 0
    finish_s: float = 0.0
    forget_s: float = 0.0
    rss_finished: int = 0
    changelog: dict[str, Any] = field(default_factory=dict)
    restore_wall_s: float = 0.0
    restore_sum_s: float = 0.0
    restore_max_s: float = 0.0
    loaded_runs: int = 0
    rss_restored: int = 0
    retained_gauge: float = 0.0


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


async def _flood(bootstrap: str, topics: Any, runs: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, **security.aiokafka_kwargs())
    await producer.start()
    try:
        for i in range(runs):
            run_id = f"r{i}-{uuid.uuid4().hex[:8]}"
            await producer.send(topics.triggers, orjson.dumps({"workflow": WORKFLOW, "input": {}, "run_id": run_id}), key=run_id.encode())
            if i % 1000 == 0:
                _progress(f"{i}/{runs} triggers sent")
        await producer.flush()
    finally:
        await producer.stop()


async def _until(port: int, done: Any, label: str, timeout: float) -> float:
    """Scrape the coordinator's /metrics until ``done(samples)``; seconds waited."""
    t0 = time.monotonic()
    while True:
        try:
            samples = scrape(port)
        except OSError:
            samples = {}
        finished, ok = done(samples)
        _progress(f"{label}: {finished}")
        if ok:
            _done()
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            _done()
            raise RuntimeError(f"{label}: not done after {timeout:.0f} s ({finished})")
        await asyncio.sleep(1.0)


async def _run_all(b: Bench, topics: Any, port: int, runs: int, forgotten: bool) -> tuple[float, float]:
    """Trigger ``runs`` runs (plus the readiness probe already done) with a measuring worker answering; wait until
    every one finished, and (``forgotten``) until every one was forgotten. Returns the seconds of each wait."""
    worker = MeasuringWorker(b.settings.bootstrap, topics)
    task = asyncio.create_task(worker.run())
    await worker.ready.wait()
    try:
        t0 = time.monotonic()
        await _flood(b.settings.bootstrap, topics, runs)
        await _until(port, lambda s: (f"{_ours(s, 'legato_runs_completed_total'):.0f}/{runs} runs completed",
                                      _ours(s, "legato_runs_completed_total") >= runs), "finishing", max(900.0, runs / 50))
        finish_s = time.monotonic() - t0
    finally:
        worker.stop.set()
        await task
    forget_s = 0.0
    if forgotten:  # the readiness probe's workflow keeps the default retention: one run stays retained
        forget_s = await _until(port, lambda s: (f"{_ours(s, 'legato_runs_forgotten_total'):.0f}/{runs} runs forgotten, "
                                                 f"{s.get('legato_runs_retained', -1):.0f} retained", _ours(s, "legato_runs_forgotten_total") >= runs),
                                "forgetting", 900.0)
    return finish_s, forget_s


def _ours(samples: dict[str, float], name: str) -> float:
    return metric_sum(samples, name, lambda k: f'workflow="{WORKFLOW}"' in k)


async def _changelog(bootstrap: str, topic: str, partitions: int) -> dict[str, Any]:
    """What a restore of every partition reads: records, tombstones, value bytes, distinct live keys; the topic's
    cleanup settings; on a local broker its segment files and whether the cleaner has been over it."""
    stats: dict[str, Any] = {"records": 0, "tombstones": 0, "value_bytes": 0}
    live: set[bytes] = set()

    def count(rec: Any) -> None:
        stats["records"] += 1
        if rec.value is None:
            stats["tombstones"] += 1
            live.discard(rec.key)
        else:
            stats["value_bytes"] += len(rec.value)
            live.add(rec.key)

    reader = kafka_io.reader(bootstrap, max_partition_fetch_bytes=8 * 1024 * 1024, **security.aiokafka_kwargs())
    await reader.start()
    try:
        t0 = time.perf_counter()
        for p in range(partitions):
            await kafka_io.read_partition(reader, TopicPartition(topic, p), count)
        stats["read_s"] = round(time.perf_counter() - t0, 2)
    finally:
        await reader.stop()
    stats["live_keys"] = len(live)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security.aiokafka_kwargs())
    await admin.start()
    try:
        resource = (await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)]))[0].resources[0]
        stats["config"] = {e[0]: e[1] for e in resource[4] if e[0] in CLEANUP_KEYS}
    finally:
        await admin.close()
    if kafka_local.is_local(bootstrap):
        data = kafka_local.broker_dir(bootstrap) / "data"
        segments = [f for p in range(partitions) for f in (data / f"{topic}-{p}").glob("*.log")]
        stats["segments"] = len(segments)
        stats["segment_bytes"] = sum(f.stat().st_size for f in segments)
        checkpoint = data / "cleaner-offset-checkpoint"
        text = checkpoint.read_text() if checkpoint.exists() else ""
        stats["cleaned_partitions"] = sum(1 for line in text.splitlines() if line.startswith(topic + " "))
    return stats


def _restore_times(log: Path, started: float, partitions: int) -> tuple[float, float, float, int] | None:
    """From a coordinator's log: (start → last partition loaded, sum and max of the load times, runs loaded), once
    every partition is loaded."""
    loaded: dict[int, tuple[float, float, int]] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = _LOADED.match(line)
        if m:
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            loaded[int(m.group(2))] = (at, float(m.group(4)), int(m.group(3)))
    if len(loaded) < partitions:
        return None
    return (max(a for a, _, _ in loaded.values()) - started, sum(s for _, s, _ in loaded.values()),
            max(s for _, s, _ in loaded.values()), sum(n for _, _, n in loaded.values()))


COMPACTING = {"segment.ms": "10000", "min.cleanable.dirty.ratio": "0.1", "delete.retention.ms": "10000"}
"""The third case's changelog: segments roll every 10 s and the cleaner takes a partition once 10 % of it is dirty,
so what was forgotten leaves the log within the benchmark (delete.retention.ms is scaled down with it: see
BENCHMARKS.md for the production values)."""


async def _create_changelog(bootstrap: str, topic: str, partitions: int, config: dict[str, str]) -> None:
    from aiokafka.admin import NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security.aiokafka_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1, topic_configs={"cleanup.policy": "compact", **config})])
    finally:
        await admin.close()


def _compacted(b: Bench, topic: str, timeout: float = 240.0) -> dict[str, Any]:
    """Wait until the log cleaner has compacted every partition and the records left stopped shrinking for 40 s (a
    tombstone outlives the first cleaning by delete.retention.ms, and goes at a later one)."""
    t0 = time.monotonic()
    seen: list[int] = []
    while time.monotonic() - t0 < timeout:
        stats = asyncio.run(_changelog(b.settings.bootstrap, topic, b.settings.partitions))
        _progress(f"waiting for the log cleaner: {stats['records']:,} records ({stats['tombstones']:,} tombstones), "
                  f"{stats.get('cleaned_partitions')}/8 partitions cleaned")
        if stats.get("cleaned_partitions") == b.settings.partitions:
            seen.append(stats["records"])
        if len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]:
            break
        time.sleep(20)
    _done()
    stats["waited_s"] = round(time.monotonic() - t0)
    return stats


def _case(b: Bench, runs: int, retention: str | None, changelog: dict[str, str] | None = None) -> Case:
    case = Case(("forgotten" if retention else "retained") + (", compacting changelog" if changelog else ""), retention)
    topics = b.topics("t")
    if changelog:
        asyncio.run(_create_changelog(b.settings.bootstrap, topics.changelog, b.settings.partitions, changelog))
    workdir = b.workdir / f"retention-{case.label.replace(', ', '-').replace(' ', '-')}"
    (workdir / "workflows").mkdir(parents=True)
    (workdir / "workflows" / "one.yaml").write_text(_workflow(retention))
    (workdir / "workflows" / "probe.yaml").write_text((b.workdir / "workflows" / "one.yaml").read_text())  # bench_one, for _wait_ready
    port = free_port()
    procs = Coordinators(b.settings, topics.prefix, workdir, {"LEGATO_LOGLEVEL": "info", "LEGATO_METRICS_PORT": str(port)})
    print(f"retention, {case.label} ({retention or 'default 7d'}): prefix {topics.prefix}, logs in {workdir}", file=sys.stderr)
    procs.start(1)
    try:
        asyncio.run(b._wait_ready(topics))
        case.finish_s, case.forget_s = asyncio.run(_run_all(b, topics, port, runs, retention is not None))
        case.runs = runs
        time.sleep(6)  # the coordinator hands freed heap back to the OS every 5 s
        case.rss_finished = procs.rss_bytes(0)
        case.retained_gauge = scrape(port).get("legato_runs_retained", -1)
        case.changelog = (_compacted(b, topics.changelog) if changelog
                          else asyncio.run(_changelog(b.settings.bootstrap, topics.changelog, b.settings.partitions)))
        procs.procs[0].send_signal(signal.SIGKILL)
        procs.procs[0].wait(30)
        started = time.time()
        procs.start(1)
        log = workdir / "coordinator-1.log"
        deadline = time.monotonic() + 900
        while (times := _restore_times(log, started, b.settings.partitions)) is None:
            if procs.procs[1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fresh coordinator did not load its partitions; see {log}")
            _progress(f"{case.label}: restoring ({time.time() - started:.0f} s)")
            time.sleep(0.5)
        _done()
        case.restore_wall_s, case.restore_sum_s, case.restore_max_s, case.loaded_runs = times
        time.sleep(6)
        case.rss_restored = procs.rss_bytes(1)
    finally:
        procs.stop()
    return case


def bench_retention(b: Bench, runs: int) -> Report:
    """The retained case (baseline), the forgotten one, and the forgotten one on a changelog that the log cleaner
    compacts within the benchmark, measured in the same run."""
    retained = _case(b, runs, None)
    cases = [_case(b, runs, "1s"), _case(b, runs, "1s", COMPACTING)]
    report = Report(f"legato bench retention --memory-runs {runs}")
    rows = [
        ("coordinator RSS, all runs finished", lambda c: _mib(c.rss_finished), lambda f, r: f.rss_finished / r.rss_finished),
        ("changelog records a restore reads", lambda c: f"{c.changelog['records']:,} ({c.changelog['tombstones']:,} tombstones)",
         lambda f, r: f.changelog["records"] / r.changelog["records"]),
        ("changelog value bytes", lambda c: _mib(c.changelog["value_bytes"]), lambda f, r: f.changelog["value_bytes"] / r.changelog["value_bytes"]),
        ("restore: runs loaded", lambda c: f"{c.loaded_runs:,}", None),
        ("restore: sum of the 8 partitions' load times", lambda c: f"{c.restore_sum_s:.2f} s", lambda f, r: f.restore_sum_s / r.restore_sum_s),
        ("restore: fresh process start → last partition loaded", lambda c: f"{c.restore_wall_s:.1f} s", lambda f, r: f.restore_wall_s / r.restore_wall_s),
        ("coordinator RSS after the restore", lambda c: _mib(c.rss_restored), lambda f, r: f.rss_restored / r.rss_restored),
    ]
    for forgotten in cases:
        for name, show, ratio in rows:
            report.rows.append(Row(f"{forgotten.label}: {name}", show(forgotten), show(retained), f"{ratio(forgotten, retained):.2f}" if ratio else "-",
                                   "report", "-"))
    for c in (retained, *cases):
        cl = c.changelog
        forgot = f", all forgotten {c.forget_s:.0f} s later" if c.retention else ""
        waited = f" (after waiting {cl['waited_s']} s for it)" if "waited_s" in cl else ""
        report.notes.append(
            f"{c.label} (retention {c.retention or 'default 7d'}): {c.runs:,} runs finished {c.finish_s:.0f} s after the first trigger{forgot} "
            f"(legato_runs_retained then: {c.retained_gauge:.0f}, the readiness probe included); "
            f"changelog {cl['records']:,} records, {cl['live_keys']:,} live keys, read in {cl['read_s']} s by the benchmark's own reader; "
            f"{cl.get('segments', '?')} segment files ({_mib(cl.get('segment_bytes', 0))}); partitions the log cleaner has compacted: "
            f"{cl.get('cleaned_partitions', '?')}/8{waited}; topic config {cl['config']}; slowest partition load {c.restore_max_s:.2f} s.")
    report.notes.append("Legato column: a forgotten case; baseline column: the retained case, measured in the same run. The fresh coordinator "
                        "was started right after the SIGKILL, so its start → loaded time includes waiting for the dead member's session (10 s) "
                        "to expire before the group assigns the partitions; the sum of the load times is the restore itself.")
    return report
