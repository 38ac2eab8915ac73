"""``python -m legato.tools.bench_console``: server time of the console's runs list over an index of 100,000 runs.

Fills a fresh index file through ``RunIndex.apply_all`` with synthetic changelog documents and run events (the
same path the feed takes), then times the runs page handler (query + counts + template) for the filters a user
clicks. The baseline, measured in the same run on the same file, is the same handler with the runs table's
secondary indexes dropped: what they buy. Goal: under 200 ms per listing.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sqlite3
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson
from aiohttp.test_utils import make_mocked_request

from legato.streams.config import Settings
from legato.streams.console.index import RunIndex
from legato.streams.console.web import Console
from legato.topics.names import Topics

GOAL_MS = 200.0
WORKFLOWS = [f"workflow_{i:02d}" for i in range(20)]
STATUSES = ["succeeded"] * 80 + ["failed"] * 10 + ["cancelled"] * 3 + ["running"] * 7


def fill(index: RunIndex, runs: int, now_ms: int, batch: int = 5000) -> float:
    """``runs`` runs over the last 7 days: a changelog document each, a run event for half; returns seconds."""
    topics = Topics(index.topics.prefix)
    started = time.perf_counter()
    offset = 0
    for first in range(0, runs, batch):
        records = []
        for i in range(first, min(runs, first + batch)):
            run_id = f"run-{i:07d}"
            status = STATUSES[(i * 7919) % len(STATUSES)]
            begin = now_ms - (runs - i) * (7 * 86_400_000 // runs)
            state = {"run_id": run_id, "workflow": WORKFLOWS[i % len(WORKFLOWS)], "version": 1 + (i // 7) % 3, "status": status,
                     "input": {"customer": f"c{i}", "amount": i % 1000}, "correlation_id": f"order-{i}", "started_ms": begin,
                     "finished_ms": None if status == "running" else begin + 1500 + i % 900, "cost": {"usd": (i % 50) / 1000},
                     "steps": {f"s{k}": {"key": f"s{k}", "step_id": f"s{k}", "kind": "activity", "frame": "root", "status": "succeeded",
                                         "attempt": 1, "started_ms": begin + k * 100, "finished_ms": begin + k * 100 + 90, "output": {"k": k}}
                               for k in range(4)}}
            records.append((topics.changelog, i % 8, offset, run_id.encode(), orjson.dumps(state), begin))
            if i % 2 == 0:
                records.append((topics.runs, i % 8, offset, run_id.encode(), orjson.dumps(
                    {"type": "run.started", "run_id": run_id, "workflow": state["workflow"], "status": "running",
                     "started_at": datetime.fromtimestamp(begin / 1000, tz=timezone.utc).isoformat()}), begin))
            offset += 1
        index.apply_all(records)
    return time.perf_counter() - started


QUERIES = [
    ("all runs, page 1", {}),
    ("workflow", {"workflow": "workflow_07"}),
    ("status failed", {"status": "failed"}),
    ("workflow + version + status", {"workflow": "workflow_07", "version": "2", "status": "succeeded"}),
    ("started within 1h", {"since": "1h"}),
    ("correlation_id search", {"q": "order-4242"}),
    ("run_id prefix search", {"q": "run-00999"}),
    ("all runs, page 200", {"page": "200"}),
]


async def _time(console: Console, query: dict[str, str], repeat: int) -> list[float]:
    path = "/?" + "&".join(f"{k}={v}" for k, v in query.items())
    samples = []
    for _ in range(repeat):
        request = make_mocked_request("GET", path)
        started = time.perf_counter()
        response = await console.runs_page(request)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status == 200
    return samples


def measure(path: Path, prefix: str, repeat: int, drop_indexes: bool = False) -> dict[str, list[float]]:
    index = RunIndex(path, prefix)
    if drop_indexes:  # after opening: RunIndex creates missing indexes
        for (name,) in index.db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND name GLOB 'runs_*'").fetchall():
            index.db.execute(f"DROP INDEX {name}")
    console = Console(Settings(prefix=prefix), index, read_only=True)
    try:
        return {name: asyncio.run(_time(console, q, repeat)) for name, q in QUERIES}
    finally:
        index.close()


def _p95(samples: list[float]) -> float:
    return sorted(samples)[max(0, int(len(samples) * 0.95) - 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m legato.tools.bench_console", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20, help="timed requests per query")
    parser.add_argument("--output", default=None, help="append the results to this markdown file (e.g. BENCHMARKS.md)")
    args = parser.parse_args(argv)

    prefix = "bench"
    workdir = Path(tempfile.mkdtemp(prefix="legato-bench-console-"))
    try:
        path = workdir / "index.sqlite"
        index = RunIndex(path, prefix)
        now_ms = int(time.time() * 1000)
        fill_s = fill(index, args.runs, now_ms)
        index.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        index.db.execute("ANALYZE")
        index.close()
        size_mb = path.stat().st_size / 2**20
        indexed = measure(path, prefix, args.repeat)
        baseline = measure(path, prefix, max(3, args.repeat // 4), drop_indexes=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    worst = max(statistics.median(s) for s in indexed.values())
    lines = [
        f"### Console runs list over {args.runs:,} runs ({datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')})",
        "",
        f"Command: `python -m legato.tools.bench_console --runs {args.runs} --repeat {args.repeat}`. Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, load average "
        f"{os.getloadavg()[0]:.1f} while measuring. Index filled through `RunIndex.apply_all` in {fill_s:.1f} s "
        f"({args.runs / fill_s:,.0f} runs/s), {size_mb:.0f} MiB. Server time of the runs page handler (query, counts by status, "
        f"template), median and p95 of {args.repeat} requests; baseline: the same handler on the same file after dropping "
        f"the runs table's secondary indexes (median of {max(3, args.repeat // 4)}).",
        "",
        "| listing | median ms | p95 ms | baseline (no indexes) median ms |",
        "|---|---|---|---|",
        *(f"| {name} | {statistics.median(s):.1f} | {_p95(s):.1f} | {statistics.median(baseline[name]):.1f} |" for name, s in indexed.items()),
        "",
        f"Slowest median {worst:.1f} ms: goal (< {GOAL_MS:.0f} ms) {'met' if worst < GOAL_MS else 'NOT met'}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as out:
            out.write("\n" + text)
    return 0 if worst < GOAL_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
