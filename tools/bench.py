"""``legato bench [NAME]``: Legato against a raw aiokafka pipe, measured in the same run.

The measuring worker is an independent aiokafka client (nothing but the topic contract): it answers every
request of the benchmark activity at once and records, per run, when it produced a completion and when the
next request reached it — the orchestration overhead of one step, whichever process sits in between (the
Legato coordinator or the raw pipe: a stateless consumer that turns each completion into the next request).
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from legato.streams import security
from legato.tools import kafka_local
from legato.streams.admin import delete_topics_under, ensure_topics
from legato.streams.config import Settings
from legato.topics.client import LegatoClient
from legato.topics.names import Topics

ROOT = Path(__file__).resolve().parent.parent
ACTIVITY = "bench_noop"
NAMES = ("overhead", "throughput", "fanout", "speedup", "memory", "scaleout", "latency", "retention", "runs-show", "limits")
"""What ``legato bench all`` runs; ``replication`` starts its own 3-broker cluster and runs only when named."""


@dataclass
class Row:
    name: str
    legato: str
    baseline: str
    ratio: str
    goal: str
    met: str


@dataclass
class Report:
    command: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _progress(text: str) -> None:
    print(f"\r\033[K  {text}", end="", file=sys.stderr, flush=True)


def _done() -> None:
    print(file=sys.stderr)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _sequential_yaml(name: str, steps: int) -> str:
    lines = [f"name: {name}", "version: 1", "steps:"]
    for i in range(steps):
        lines += [f"  - id: s{i}", f"    activity: {ACTIVITY}", "    input: {i: %d}" % i, "    timeout: 1h"]
    return "\n".join(lines) + "\n"


FANOUT_YAML = f"""name: bench_fanout
version: 1
steps:
  - id: fan
    map:
      items: "input.items"
      steps:
        - id: item
          activity: {ACTIVITY}
          input: {{i: "${{ item }}"}}
          timeout: 1h
"""


async def _assigned_pipe(bootstrap: str, topic: str, group: str, acks: int | str = 1) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
    """A started consumer of ``topic`` (its own group, positioned at the end) and a linger-0 producer (``acks``)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"{group}-{uuid.uuid4()}",
                                auto_offset_reset="latest", fetch_max_wait_ms=50, max_poll_records=2000, isolation_level="read_committed", **security.aiokafka_kwargs())
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=acks, **security.aiokafka_kwargs())
    await consumer.start()
    await producer.start()
    while not consumer.assignment():
        await asyncio.sleep(0.05)
    for tp in consumer.assignment():
        await consumer.position(tp)
    return consumer, producer


class MeasuringWorker:
    """Answers every request at once; records completion-produced → next-request-received per run."""

    def __init__(self, bootstrap: str, topics: Topics, acks: int | str = 1):
        self.bootstrap, self.topics, self.acks = bootstrap, topics, acks
        self.sent_at: dict[str, float] = {}
        self.gaps: list[tuple[float, float]] = []  # (when, gap seconds)
        self.received = 0
        self.first_request: float | None = None
        self.last_request: float | None = None
        self.last_completion: float | None = None
        self.fetched: dict[str, float] = {}  # request id → wall clock when fetched (only when ``trace``)
        self.done: dict[str, float] = {}  # request id → wall clock when its completion was handed to the producer
        self.trace = False
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        consumer, producer = await _assigned_pipe(self.bootstrap, self.topics.requests(ACTIVITY), "bench-worker", self.acks)
        try:
            self.ready.set()
            while not self.stop.is_set():
                batch = await consumer.getmany(timeout_ms=50)
                for records in batch.values():
                    for msg in records:
                        now = time.perf_counter()
                        req = orjson.loads(msg.value)
                        run_id = req["run_id"]
                        self.received += 1
                        self.first_request = self.first_request or now
                        self.last_request = now
                        sent = self.sent_at.pop(run_id, None)
                        if sent is not None:
                            self.gaps.append((now, now - sent))
                        if self.trace:
                            self.fetched[req["request_id"]] = time.time()
                        completion = {k: req[k] for k in ("request_id", "run_id", "step_id", "attempt")}
                        completion.update(status="succeeded", output=req.get("input"))
                        await producer.send(self.topics.completions, orjson.dumps(completion), key=run_id.encode())
                        self.sent_at[run_id] = self.last_completion = time.perf_counter()
                        if self.trace:
                            self.done[req["request_id"]] = time.time()
        finally:
            await consumer.stop()
            await producer.stop()


async def raw_pipe(bootstrap: str, topics: Topics, steps: int, stop: asyncio.Event, ready: asyncio.Event, acks: int | str = 1) -> None:
    """The baseline: read each completion and produce the next request, with no state and no decisions."""
    consumer, producer = await _assigned_pipe(bootstrap, topics.completions, "rawpipe", acks)
    try:
        ready.set()
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=50)
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used (Linux /proc); 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _replication_env(settings: Settings) -> dict[str, str]:
    """The replication settings of ``settings`` as the environment of Legato's processes (when set)."""
    env = {}
    if settings.replication_factor is not None:
        env["LEGATO_REPLICATION_FACTOR"] = str(settings.replication_factor)
    if settings.min_insync_replicas is not None:
        env["LEGATO_MIN_INSYNC_REPLICAS"] = str(settings.min_insync_replicas)
    return env


class Coordinators:
    """Coordinator subprocesses on a benchmark's own topics, killed at the end."""

    def __init__(self, settings: Settings, prefix: str, workdir: Path, extra_env: dict[str, str] | None = None):
        self.settings, self.prefix, self.workdir = settings, prefix, workdir
        self.env = {**os.environ, "LEGATO_BOOTSTRAP": settings.bootstrap, "LEGATO_TOPIC_PREFIX": prefix,
                    "LEGATO_DATA_DIR": str(workdir / "data"), **_replication_env(settings), **(extra_env or {})}
        self.procs: list[subprocess.Popen] = []

    def start(self, n: int = 1, handlers: str | None = None, role: str = "coordinator") -> None:
        for i in range(n):
            log = open(self.workdir / f"{role}-{len(self.procs)}.log", "w")
            cmd = [sys.executable, "-m", "legato.streams.cli", role]
            if role in ("coordinator", "dev"):
                cmd += ["--workflows", str(self.workdir / "workflows")]
            if handlers:
                cmd += ["--handlers", handlers]
            env = dict(self.env)
            env["LEGATO_DATA_DIR"] = str(self.workdir / f"data-{len(self.procs)}")
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT)))

    def cpu_seconds(self, index: int = 0) -> float:
        return cpu_seconds(self.procs[index].pid)

    def rss_bytes(self, index: int = 0) -> int:
        for line in Path(f"/proc/{self.procs[index].pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


class Bench:
    def __init__(self, settings: Settings, acks: int | str = 1):
        self.settings = settings
        self.acks = acks  # of the measuring worker and the raw pipe (Legato's producers always use acks=all)
        kafka_local.ensure_broker(settings.bootstrap)
        self.workdir = Path(tempfile.mkdtemp(prefix="legato-bench-"))
        (self.workdir / "workflows").mkdir()
        (self.workdir / "workflows" / "seq.yaml").write_text(_sequential_yaml("bench_sequential", 20))
        (self.workdir / "workflows" / "one.yaml").write_text(_sequential_yaml("bench_one", 1))
        (self.workdir / "workflows" / "fanout.yaml").write_text(FANOUT_YAML)
        self.prefixes: list[str] = []  # every topic prefix this run created, deleted by ``cleanup``

    def topics(self, tag: str) -> Topics:
        topics = self.named(tag)
        asyncio.run(ensure_topics(self.settings.bootstrap, topics, [ACTIVITY], self.settings.partitions, replication=self.settings.replication))
        return topics

    def named(self, tag: str) -> Topics:
        """A fresh topic prefix for one benchmark, deleted with every topic under it when the run ends."""
        topics = Topics(f"bench{tag}{uuid.uuid4().hex[:6]}")
        self.prefixes.append(topics.prefix)
        return topics

    def cleanup(self) -> None:
        """Delete the topics of every prefix this run created (a broker that keeps them all slows down)."""
        try:
            deleted = asyncio.run(delete_topics_under(self.settings.bootstrap, self.prefixes))
            print(f"deleted the benchmark's {len(deleted)} topics", file=sys.stderr)
        except Exception as exc:  # the figures stand; leftover topics only cost the broker
            print(f"could not delete the benchmark's topics ({type(exc).__name__}: {exc})", file=sys.stderr)

    # --- steady load: the raw pipe and Legato driven alike --------------------------------------

    async def _drive(self, topics: Topics, legato: bool, runs: int, steps: int, rate: float | None, label: str,
                     procs: "Coordinators | None" = None, trace: bool = False) -> dict[str, Any]:
        """Start ``runs`` runs of ``steps`` steps (all at once, or ``rate`` runs/s) and wait for every step; with
        the CPU seconds the broker, the coordinator (``procs``) and this process (the measuring worker, the raw pipe
        and the load) spent meanwhile."""
        worker = MeasuringWorker(self.settings.bootstrap, topics, self.acks)
        worker.trace = trace
        tasks = [asyncio.create_task(worker.run())]
        pipe_ready = asyncio.Event()
        if not legato:
            tasks.append(asyncio.create_task(raw_pipe(self.settings.bootstrap, topics, steps, worker.stop, pipe_ready, self.acks)))
        else:
            pipe_ready.set()
        await worker.ready.wait()
        await pipe_ready.wait()
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap, linger_ms=5, acks=self.acks, **security.aiokafka_kwargs())
        await producer.start()
        expected = runs * steps
        cpu = {"broker": kafka_local.broker_pid(self.settings.bootstrap), "bench": os.getpid()}
        if procs is not None and procs.procs:
            cpu["coordinator"] = procs.procs[0].pid
        cpu = {name: pid for name, pid in cpu.items() if pid is not None}
        cpu_before = {name: cpu_seconds(pid) for name, pid in cpu.items()}
        try:
            started = time.perf_counter()
            for i in range(runs):
                run_id = f"b{i}-{uuid.uuid4().hex[:8]}"
                if legato:
                    value = orjson.dumps({"workflow": "bench_sequential" if steps == 20 else "bench_one", "input": {}, "run_id": run_id})
                    await producer.send(topics.triggers, value, key=run_id.encode())
                else:
                    first = {"request_id": f"{run_id}/s0/1", "run_id": run_id, "step_id": "s0", "activity": ACTIVITY, "attempt": 1, "input": {}}
                    await producer.send(topics.requests(ACTIVITY), orjson.dumps(first), key=run_id.encode())
                if rate:
                    delay = started + (i + 1) / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if i % 50 == 0:
                    _progress(f"{label}: {i}/{runs} runs started, {worker.received}/{expected} steps")
            await producer.flush()
            deadline = time.monotonic() + max(120, expected / 100)
            while worker.received < expected and time.monotonic() < deadline:
                _progress(f"{label}: {worker.received}/{expected} steps")
                await asyncio.sleep(0.2)
            _done()
            cpu_spent = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in cpu.items()}
        finally:
            await producer.stop()
            worker.stop.set()
            await asyncio.gather(*tasks)
        elapsed = (worker.last_request or started) - started
        return {"steps": worker.received, "expected": expected, "elapsed": elapsed, "gaps": [g for _, g in worker.gaps], "cpu": cpu_spent,
                "fetched": worker.fetched, "done": worker.done}

    def steady(self, legato: bool, runs: int, steps: int = 20, rate: float | None = None, coordinators: int = 1, label: str = "",
               trace: bool = False) -> dict[str, Any]:
        """A steady load; with ``trace``, the coordinator's LEGATO_TRACE_FILE is read into ``batches`` (request id →
        its hops) and the measuring worker's wall-clock moments are kept (``fetched``, ``done``)."""
        topics = self.topics("l" if legato else "r")
        trace_file = self.workdir / f"trace-{topics.prefix}.jsonl"
        procs = Coordinators(self.settings, topics.prefix, self.workdir, {"LEGATO_TRACE_FILE": str(trace_file)} if trace and legato else None)
        try:
            if legato:
                procs.start(coordinators)
                asyncio.run(self._wait_ready(topics))
            out = asyncio.run(self._drive(topics, legato, runs, steps, rate, label or ("legato" if legato else "raw pipe"), procs, trace))
        finally:
            procs.stop()
        if trace and legato:
            from legato.tools.bench_latency import _read_trace

            out["batches"] = _read_trace(trace_file)
        return out

    async def _wait_ready(self, topics: Topics) -> None:
        """A one-step run through a throwaway worker proves the coordinator has its partitions."""
        worker = MeasuringWorker(self.settings.bootstrap, topics)
        task = asyncio.create_task(worker.run())
        await worker.ready.wait()
        try:
            async with LegatoClient(self.settings.bootstrap, topics.prefix, **security.aiokafka_kwargs()) as client:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        await client.run("bench_one", {}, timeout=10)
                        return
                    except (asyncio.TimeoutError, RuntimeError):
                        if time.monotonic() > deadline:
                            raise RuntimeError("the coordinator did not start within 120 s; see its log in " + str(self.workdir))
        finally:
            worker.stop.set()
            await task


def _ms(values: list[float], q: float) -> float:
    return _percentile(values, q) * 1000


def bench_throughput(b: Bench, runs: int) -> tuple[Report, float]:
    raw = b.steady(False, runs)
    leg = b.steady(True, runs)
    raw_rate = raw["steps"] / raw["elapsed"]
    leg_rate = leg["steps"] / leg["elapsed"]
    report = Report(f"legato bench throughput --runs {runs}")
    ratio = leg_rate / raw_rate
    report.rows.append(Row("throughput (steps/s)", f"{leg_rate:.0f}", f"{raw_rate:.0f}", f"{ratio:.2f}", "≥ 5,000 and ≥ 0.40 of raw", "yes" if leg_rate >= 5000 and ratio >= 0.4 else "no"))
    report.notes.append(f"{runs} runs × 20 no-op steps started at once; Legato {leg['steps']}/{leg['expected']} steps in {leg['elapsed']:.1f} s, raw pipe {raw['steps']}/{raw['expected']} in {raw['elapsed']:.1f} s.")
    return report, leg_rate


def bench_overhead(b: Bench, max_rate: float, runs: int) -> Report:
    """Per-step overhead at 10, 50 and 80 % of the throughput measured in the same run; at each level the hops of
    Legato's steps (from the coordinator's trace) and the CPU each process spent per step, Legato against the raw pipe."""
    from legato.tools.bench_latency import HOPS, _hop_rows, steady_hop_samples

    report = Report(f"legato bench overhead --runs {runs}")
    for share in (0.1, 0.5, 0.8):
        rate = max(0.5, share * max_rate / 20)  # runs/s; each run is 20 steps
        n = max(5, min(runs, int(rate * 20)))  # about 20 s of load at most
        raw = b.steady(False, n, rate=rate, label=f"raw pipe at {share:.0%}")
        leg = b.steady(True, n, rate=rate, label=f"legato at {share:.0%}", trace=True)
        lg, rg = leg["gaps"], raw["gaps"]
        for q, goal in ((50, 5.0), (99, 25.0), (99.9, None)):
            lv, rv = _ms(lg, q), _ms(rg, q)
            met = ("yes" if lv <= goal else "no") if goal is not None else "-"
            report.rows.append(Row(f"overhead p{q} at {share:.0%} ({rate * 20:.0f} steps/s)", f"{lv:.2f} ms", f"{rv:.2f} ms", f"{lv / rv:.2f}" if rv else "-",
                                   f"≤ {goal:g} ms" if goal else "-", met))
        hops = Report("")
        _hop_rows(hops, f"hops at {share:.0%}", steady_hop_samples(leg), None, ("completion sent → next request fetched", "done", "fetched"), HOPS)
        report.rows += [r for r in hops.rows if "overhead" not in r.name]  # the totals are the rows above
        for name in ("coordinator", "broker", "bench"):
            lc, rc = leg["cpu"].get(name), raw["cpu"].get(name)
            if lc is None:
                continue
            per = lambda spent, out: spent / max(1, out["steps"]) * 1e6  # noqa: E731
            report.rows.append(Row(f"CPU per step at {share:.0%}: {_CPU_NAMES[name]}", f"{per(lc, leg):.0f} µs ({lc / max(leg['elapsed'], 1e-9):.0%} of a core)",
                                   f"{per(rc, raw):.0f} µs ({rc / max(raw['elapsed'], 1e-9):.0%})" if rc is not None else "-", "-", "-", "-"))
        # contention: the hops wait for a CPU when broker, coordinator and worker together fill the machine's cores
        busy = lambda out: sum(out["cpu"].values()) / max(out["elapsed"], 1e-9)  # noqa: E731
        report.rows.append(Row(f"cores busy at {share:.0%} (these processes, of {os.cpu_count()})", f"{busy(leg):.2f}", f"{busy(raw):.2f}", "-", "-", "-"))
    report.notes.append("Overhead: completion produced → next request received by the same measuring worker; load as a share of the throughput measured in the same run.")
    report.notes.append("Hop rows are p50 / p99 of Legato's steps at that load, from the coordinator's LEGATO_TRACE_FILE (per request: polled, deciding, "
                        "decided, handed to the early producer; per batch: committed) and the measuring worker's wall clock.")
    report.notes.append("CPU per step: CPU seconds over the load / steps; the bench process holds the measuring worker, the load and (raw pipe) the pipe itself. "
                        "All of them and the broker share the machine's cores.")
    return report


_CPU_NAMES = {"coordinator": "coordinator process", "broker": "Kafka broker", "bench": "bench process (worker, load; raw: + the pipe)"}


def bench_fanout(b: Bench, sizes: list[int]) -> Report:
    report = Report("legato bench fanout --sizes " + ",".join(map(str, sizes)))
    topics = b.topics("f")
    procs = Coordinators(b.settings, topics.prefix, b.workdir)
    procs.start(1)
    try:
        asyncio.run(b._wait_ready(topics))
        for n in sizes:
            result = asyncio.run(_fanout_once(b, topics, procs, n))
            report.rows.append(Row(f"map N={n}: start → all requests", f"{result['dispatch']:.3f} s", "-", "-", "-", "-"))
            report.rows.append(Row(f"map N={n}: last completion → join", f"{result['join'] * 1000:.1f} ms", "-", "-", "-", "-"))
            report.rows.append(Row(f"map N={n}: coordinator CPU per branch", f"{result['cpu_per_branch'] * 1e6:.0f} µs", "-", "-", "≤ 50 µs",
                                   "yes" if result["cpu_per_branch"] <= 50e-6 else "no"))
    finally:
        procs.stop()
    report.notes.append("A `map` step over N no-op items (no max_concurrency). CPU is the coordinator process's user+system time over the run, divided by N.")
    return report


async def _fanout_once(b: Bench, topics: Topics, procs: Coordinators, n: int) -> dict[str, float]:
    worker = MeasuringWorker(b.settings.bootstrap, topics)
    task = asyncio.create_task(worker.run())
    await worker.ready.wait()
    try:
        async with LegatoClient(b.settings.bootstrap, topics.prefix, **security.aiokafka_kwargs()) as client:
            cpu0 = procs.cpu_seconds()
            started = time.perf_counter()
            run = asyncio.create_task(client.run("bench_fanout", {"items": list(range(n))}, timeout=max(300, n / 20)))
            while not run.done():
                _progress(f"fan-out N={n}: {worker.received}/{n} requests answered")
                await asyncio.sleep(0.2)
            _done()
            event = run.result()
            finished = time.perf_counter()
            cpu = procs.cpu_seconds() - cpu0
    finally:
        worker.stop.set()
        await task
    if event.status != "succeeded" or worker.received != n:
        raise RuntimeError(f"fan-out N={n} ended {event.status} with {worker.received} requests: {event.error}")
    return {"dispatch": (worker.last_request or started) - started if n else 0.0,
            "join": finished - (worker.last_completion or finished), "cpu_per_branch": cpu / max(n, 1)}


def bench_speedup(b: Bench, runs: int = 3) -> Report:
    """due_diligence with four 1 s checks: parallel / sequential duration."""
    topics = b.named("s")
    procs = Coordinators(b.settings, topics.prefix, b.workdir, {"LEGATO_DEMO_SCALE": "2.0"})
    examples = ROOT / "workflows" / "examples"
    for name in ("due_diligence.yaml", "due_diligence_sequential.yaml"):
        (b.workdir / "workflows" / name).write_text((examples / name).read_text())
    procs.start(1, handlers="legato.handlers.examples.demo", role="dev")
    durations: dict[str, list[float]] = {}
    try:
        async def go() -> None:
            async with LegatoClient(b.settings.bootstrap, topics.prefix, **security.aiokafka_kwargs()) as client:
                customer = {"name": "Ada", "credit_score": 742, "references": ["a", "b", "c"]}
                deadline = time.monotonic() + 120
                while True:
                    try:
                        await client.run("due_diligence", customer, timeout=20)
                        break
                    except (asyncio.TimeoutError, RuntimeError):
                        if time.monotonic() > deadline:
                            raise
                for wf in ("due_diligence_sequential", "due_diligence"):
                    for i in range(runs):
                        _progress(f"speed-up: {wf} run {i + 1}/{runs}")
                        event = await client.run(wf, customer, timeout=60)
                        durations.setdefault(wf, []).append(event.duration_ms / 1000)
                _done()
        asyncio.run(go())
    finally:
        procs.stop()
    seq = statistics.median(durations["due_diligence_sequential"])
    par = statistics.median(durations["due_diligence"])
    ratio = par / seq
    report = Report(f"legato bench speedup --runs {runs}")
    report.rows.append(Row("parallel / sequential duration", f"{par:.3f} s / {seq:.3f} s", "0.25 (4 equal checks)", f"{ratio:.3f}",
                           "within 2 % of 0.25 + overhead", "yes" if ratio <= 0.25 * 1.02 + 0.02 else "no"))
    report.notes.append("Four 1 s checks (demo handlers at LEGATO_DEMO_SCALE=2), median of the runs' duration_ms on the terminal event; the choice step after the checks adds a few ms to both.")
    return report


def bench_memory(b: Bench, runs: int, store: str) -> Report:
    topics = b.topics("m")
    procs = Coordinators(b.settings, topics.prefix, b.workdir, {"LEGATO_STORE": store})
    procs.start(1)
    try:
        asyncio.run(b._wait_ready(topics))
        rss0 = procs.rss_bytes()

        async def flood() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=b.settings.bootstrap, linger_ms=20, **security.aiokafka_kwargs())
            await producer.start()
            try:
                for i in range(runs):
                    run_id = f"m{i}-{uuid.uuid4().hex[:8]}"
                    await producer.send(topics.triggers, orjson.dumps({"workflow": "bench_one", "input": {}, "run_id": run_id}), key=run_id.encode())
                    if i % 1000 == 0:
                        _progress(f"memory: {i}/{runs} triggers sent")
                await producer.flush()
            finally:
                await producer.stop()
            # nobody answers the requests: every run waits in its step; wait until the coordinator has them all
            # (counting committed requests: end offsets also count the transactions' commit markers)
            consumer = AIOKafkaConsumer(topics.requests(ACTIVITY), bootstrap_servers=b.settings.bootstrap, group_id=None, auto_offset_reset="earliest",
                                        isolation_level="read_committed", **security.aiokafka_kwargs())
            await consumer.start()
            try:
                total = 0
                deadline = time.monotonic() + max(300, runs / 200)
                while time.monotonic() < deadline and total < runs + 1:
                    batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
                    total += sum(len(records) for records in batch.values())
                    _progress(f"memory: {total}/{runs + 1} runs waiting in their step, RSS {procs.rss_bytes() / 2**20:.0f} MiB")
                _done()
            finally:
                await consumer.stop()
        asyncio.run(flood())
        samples = []  # the heap is trimmed every 5 s (loop._trim_heap): the last sample is after at least three trims
        for _ in range(8):
            time.sleep(2)
            samples.append(procs.rss_bytes())
        rss1 = samples[-1]
    finally:
        procs.stop()
    per_run = (rss1 - rss0) / runs
    report = Report(f"legato bench memory --runs {runs} --store {store}")
    report.rows.append(Row(f"coordinator RSS growth per run in flight ({store} store)", f"{per_run / 1024:.2f} KiB", "-", "-", "≤ 2 KiB", "yes" if per_run <= 2048 else "no"))
    report.notes.append(f"{runs} runs of a one-step workflow whose requests nobody answers; RSS {rss0 / 2**20:.0f} MiB → {rss1 / 2**20:.0f} MiB "
                        f"(every 2 s after the last run was waiting: {', '.join(f'{x / 2**20:.0f}' for x in samples)} MiB).")
    return report


def bench_scaleout(b: Bench, runs: int) -> Report:
    one = b.steady(True, runs, coordinators=1, label="one coordinator")
    two = b.steady(True, runs, coordinators=2, label="two coordinators")
    r1, r2 = one["steps"] / one["elapsed"], two["steps"] / two["elapsed"]
    report = Report(f"legato bench scaleout --runs {runs}")
    report.rows.append(Row("throughput, 2 coordinators / 1", f"{r2:.0f} / {r1:.0f} steps/s", "-", f"{r2 / r1:.2f}", "report", "-"))
    report.notes.append("8 partitions; the broker, the measuring worker and both coordinators share the same 2 cores, so a ratio near 1 is the machine's limit, not the design's.")
    return report


def main(settings: Settings, names: list[str], runs: int, output: Path | None, sizes: list[int], memory_runs: int, store: str,
         latency_runs: int = 30) -> int:
    if "replication" in names:  # on a 3-broker cluster of its own at the bootstrap's port, not on the broker there
        from legato.tools.bench_replication import bench_replication

        report = bench_replication(settings, runs)
        _emit([report], output)
        names = [n for n in names if n != "replication"]
        if not names:
            return 0
    b = Bench(settings)
    try:
        return _run(b, names, runs, output, sizes, memory_runs, store, latency_runs)
    finally:
        b.cleanup()


def _run(b: "Bench", names: list[str], runs: int, output: Path | None, sizes: list[int], memory_runs: int, store: str, latency_runs: int) -> int:
    reports: list[Report] = []
    max_rate = None
    if "throughput" in names or "overhead" in names:
        print("throughput (needed for the overhead load levels)", file=sys.stderr)
        report, max_rate = bench_throughput(b, runs)
        if "throughput" in names:
            reports.append(report)
    if "overhead" in names:
        reports.append(bench_overhead(b, max_rate or 1000.0, runs))
    if "fanout" in names:
        reports.append(bench_fanout(b, sizes))
    if "speedup" in names:
        reports.append(bench_speedup(b))
    if "memory" in names:
        reports.append(bench_memory(b, memory_runs, store))
    if "scaleout" in names:
        reports.append(bench_scaleout(b, runs))
    if "latency" in names:
        from legato.tools.bench_latency import bench_latency

        reports.append(bench_latency(b, latency_runs))
    if "retention" in names:
        from legato.tools.bench_retention import bench_retention

        reports.append(bench_retention(b, memory_runs))
    if "runs-show" in names:
        from legato.tools.bench_runs_show import bench_runs_show

        reports.append(bench_runs_show(b, memory_runs))
    if "limits" in names:
        from legato.tools.bench_limits import bench_limits

        reports.append(bench_limits(b.settings, runs))
    _emit(reports, output)
    return 0


def _emit(reports: list[Report], output: Path | None) -> None:
    text = _render(reports)
    print(text)
    if output is not None:
        with output.open("a", encoding="utf-8") as fh:
            fh.write("\n" + text)


def _render(reports: list[Report]) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}; the broker shares the cores"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"### legato bench — {stamp}", "", f"Machine: {machine}", ""]
    for r in reports:
        out += [f"`{r.command}`", "", "| benchmark | Legato | raw pipe / baseline | ratio | goal | met |", "|---|---|---|---|---|---|"]
        out += [f"| {x.name} | {x.legato} | {x.baseline} | {x.ratio} | {x.goal} | {x.met} |" for x in r.rows]
        out += [""] + [f"- {n}" for n in r.notes] + [""]
    return "\n".join(out)
