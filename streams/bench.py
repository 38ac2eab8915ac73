"""``legato bench``: per-step orchestration overhead against a raw aiokafka pipe, measured in the same run.

The measuring worker is an independent aiokafka client (nothing but the topic contract). For every step it
records when it produced the completion and when the next request reached it; the difference is the
orchestration overhead of one step, whichever process sits in between (the Legato coordinator or the raw pipe).
"""
from __future__ import annotations

import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streams import kafka_local
from streams.admin import ensure_topics
from streams.config import Settings
from topics.client import LegatoClient
from topics.names import Topics

ROOT = Path(__file__).resolve().parent.parent
ACTIVITY = "bench_noop"


def _workflow_yaml(steps: int) -> str:
    lines = ["name: bench_sequential", "version: 1", "steps:"]
    for i in range(steps):
        lines += [f"  - id: s{i}", f"    activity: {ACTIVITY}", "    input: {i: %d}" % i, "    timeout: 30s"]
    return "\n".join(lines) + "\n"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class _MeasuringWorker:
    """Answers every request at once and records completion-produced → next-request-received gaps."""

    def __init__(self, bootstrap: str, topics: Topics, group: str):
        self.bootstrap, self.topics, self.group = bootstrap, topics, group
        self.sent_at: dict[str, float] = {}  # run_id -> when its last completion was produced
        self.gaps: list[float] = []
        self.done = 0

    async def run(self, stop: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(self.topics.requests(ACTIVITY), bootstrap_servers=self.bootstrap, group_id=self.group,
                                    auto_offset_reset="latest", fetch_max_wait_ms=100)
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=0)
        await consumer.start()
        await producer.start()
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=100)
                for records in batch.values():
                    for msg in records:
                        now = time.perf_counter()
                        req = orjson.loads(msg.value)
                        run_id = req["run_id"]
                        if run_id in self.sent_at:
                            self.gaps.append(now - self.sent_at.pop(run_id))
                        completion = {k: req[k] for k in ("request_id", "run_id", "step_id", "attempt")}
                        completion.update(status="succeeded", output=req.get("input"))
                        await producer.send(self.topics.completions, orjson.dumps(completion), key=run_id.encode())
                        self.sent_at[run_id] = time.perf_counter()
                        self.done += 1
        finally:
            await consumer.stop()
            await producer.stop()


async def _raw_pipe(bootstrap: str, topics: Topics, steps: int, stop: asyncio.Event) -> None:
    """The baseline: read each completion and produce the next request, with no state and no decisions."""
    consumer = AIOKafkaConsumer(topics.completions, bootstrap_servers=bootstrap, group_id=f"rawpipe-{uuid.uuid4()}",
                                auto_offset_reset="latest", fetch_max_wait_ms=100)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                for msg in records:
                    c = orjson.loads(msg.value)
                    step = int(c["step_id"][1:]) + 1
                    if step >= steps:
                        continue  # the run's last step: a coordinator would publish run.completed instead
                    request = {"request_id": f"{c['run_id']}/s{step}/1", "run_id": c["run_id"], "step_id": f"s{step}",
                               "activity": ACTIVITY, "attempt": 1, "input": {"i": step}}
                    await producer.send(topics.requests(ACTIVITY), orjson.dumps(request), key=msg.key)
    finally:
        await consumer.stop()
        await producer.stop()


async def _measure(bootstrap: str, topics: Topics, runs: int, steps: int, legato: bool) -> list[float]:
    stop = asyncio.Event()
    worker = _MeasuringWorker(bootstrap, topics, f"bench-worker-{uuid.uuid4()}")
    tasks = [asyncio.create_task(worker.run(stop))]
    if not legato:
        tasks.append(asyncio.create_task(_raw_pipe(bootstrap, topics, steps, stop)))
    await asyncio.sleep(3)  # let both consumers get their partitions before the first request
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        async with LegatoClient(bootstrap, topics.prefix) as client:
            for i in range(runs):
                run_id = f"bench-{uuid.uuid4()}"
                if legato:
                    await client.run("bench_sequential", {}, run_id=run_id, timeout=60)
                else:
                    first = {"request_id": f"{run_id}/s0/1", "run_id": run_id, "step_id": "s0", "activity": ACTIVITY, "attempt": 1, "input": {}}
                    target = worker.done + steps
                    await producer.send_and_wait(topics.requests(ACTIVITY), orjson.dumps(first), key=run_id.encode())
                    deadline = time.monotonic() + 60
                    while worker.done < target and time.monotonic() < deadline:
                        await asyncio.sleep(0.005)
                print(f"\r  {'legato' if legato else 'raw pipe'}: run {i + 1}/{runs}  ", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        await producer.stop()
        stop.set()
        await asyncio.gather(*tasks)
    return worker.gaps


def overhead(settings: Settings, runs: int = 30, steps: int = 20, output: Path | None = None) -> int:
    """Per-step overhead of a ``steps``-step sequential no-op workflow, Legato vs the raw pipe."""
    kafka_local.ensure_broker(settings.bootstrap)
    workdir = Path(tempfile.mkdtemp(prefix="legato-bench-"))
    (workdir / "bench.yaml").write_text(_workflow_yaml(steps))
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    asyncio.run(ensure_topics(settings.bootstrap, topics, [ACTIVITY], settings.partitions))
    print("baseline: raw aiokafka pipe", file=sys.stderr)
    asyncio.run(ensure_topics(settings.bootstrap, Topics(prefix + "raw"), [ACTIVITY], settings.partitions))
    raw = asyncio.run(_measure(settings.bootstrap, Topics(prefix + "raw"), runs, steps, legato=False))
    env = {**os.environ, "LEGATO_BOOTSTRAP": settings.bootstrap, "LEGATO_TOPIC_PREFIX": prefix, "LEGATO_DATA_DIR": str(workdir / "data")}
    log = open(workdir / "coordinator.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "coordinator", "--workflows", str(workdir)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    try:
        print(f"legato coordinator (log {workdir / 'coordinator.log'})", file=sys.stderr)
        legato = asyncio.run(_measure(settings.bootstrap, topics, runs, steps, legato=True))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    rows = []
    for name, values in (("legato", legato), ("raw pipe", raw)):
        ms = [v * 1000 for v in values]
        rows.append((name, len(ms), statistics.median(ms), _percentile(ms, 99), max(ms)))
    header = f"{'':10} {'steps':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    lines = [header] + [f"{n:10} {c:6d} {p50:8.2f} {p99:8.2f} {mx:8.2f}" for n, c, p50, p99, mx in rows]
    lines.append(f"{'ratio':10} {'':6} {rows[0][2] / rows[1][2]:8.2f} {rows[0][3] / rows[1][3]:8.2f}")
    print("\n".join(lines))
    if output is not None:
        _append(output, runs, steps, lines)
    return 0


def _append(path: Path, runs: int, steps: int, lines: list[str]) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, broker on the same cores"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = [
        f"\n### Per-step overhead — {stamp}\n",
        f"Command: `legato bench overhead --runs {runs} --steps {steps}`  ",
        f"Machine: {machine}  ",
        f"Load: one run at a time ({runs} runs of a {steps}-step sequential no-op workflow); overhead = completion produced → next request received, by the same measuring worker.\n",
        "```",
        *lines,
        "```",
    ]
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n".join(text) + "\n")
