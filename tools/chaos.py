"""``legato chaos``: kill real processes on a real broker and count what was lost or duplicated.

Every scenario starts its own ``legato coordinator`` / ``legato worker`` OS processes with a fresh topic prefix and
data dir, drives them only through Kafka, and judges the result only from the topics (``<prefix>.runs``,
``<prefix>.requests.*``, ``<prefix>.completions``, ``<prefix>.dlq``) and the processes' /metrics:

- ``coordinator``: N runs of a workflow with parallel, choice and loop steps; SIGKILL + restart the coordinator K times
- ``worker``: SIGKILL the worker while every run has an activity in its handler; restart it
- ``takeover``: two coordinators on 8 partitions, one SIGKILLed for good; the survivor takes its partitions over
- ``broker``: a private broker (own port and data dir) is stopped and started in the middle of runs
- ``timers``: the coordinator is killed while step timeouts, then retry back-offs, are pending
- ``waits``: N runs wait for a signal and N sleep until a due time; the coordinator is killed while they all wait
  and restarted, then the signals are sent: each waiting run ends with its signal's data, each sleeper after its due time
- ``deploy``: v2 of a workflow is deployed (``legato deploy``) while N v1 runs are in flight, and the coordinator is
  SIGKILLed: every v1 run ends as v1 (only v1's steps requested), every later trigger runs v2
- ``fuzz``: generated bad messages on triggers and completions, interleaved with valid runs
- ``retries``: step timeouts and retries under coordinator kills, answered by an independent worker (``chaos_retries``)
- ``schedules``: a schedule ticking every second while the coordinator is SIGKILLed and restarted: every tick runs
  exactly once (``chaos_schedules``)
- ``cluster``: a private 3-broker cluster (replication 3, min ISR 2): the leader broker SIGKILLed, a rolling restart,
  and a coordinator SIGKILL while a broker is down (``chaos_cluster``)

Results are printed, and appended to the file given with ``--output`` (command, date, machine). The integration tests in
``tests/integration/test_reliability.py`` and ``test_fuzz.py`` run the same code at CI size.
"""
from __future__ import annotations

import asyncio
import base64
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import orjson

from legato.streams import kafka_io
from legato.streams.config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("coordinator", "worker", "takeover", "broker", "timers", "waits", "deploy", "fuzz", "retries", "schedules", "cluster")
TERMINAL = ("run.completed", "run.failed", "run.cancelled")

HANDLERS_MODULE = "chaos_handlers"
DATA = Path(__file__).resolve().parent / "chaos_data"
"""The scenarios' workflows (``*.yaml``) and their activities (``chaos_handlers.py``)."""
ANSWERED_ELSEWHERE = ["retry_intake", "retry_kyc", "retry_score", "retry_limit", "deadline_answer"]
"""Activities no Legato handler serves: ``chaos_data/independent_worker.py`` (``retries``) or a test answers them."""
ACTIVITIES = ["chaos_echo", "chaos_slow", "chaos_nobody", "chaos_raise", "chaos_hang", "chaos_unserializable", *ANSWERED_ELSEWHERE]


def mix_expected(n: int) -> dict[str, Any]:
    return {"n": n, "sum": 3 * n, "kind": "even" if n % 2 == 0 else "odd", "iters": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port P such that P and P + 1 can both be bound now, below Linux's ephemeral range (32768+): a port handed
    out by ``bind(0)`` can be taken by any client connection's local end before the broker binds it (the private
    broker then died with "Address already in use" on port + 1)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 32_000, 2)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports between 20000 and 32000 on 127.0.0.1")


def legato_executable() -> str:
    candidate = Path(sys.executable).with_name("legato")
    return str(candidate) if candidate.exists() else str(REPO_ROOT / ".venv" / "bin" / "legato")


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    args: list[str]
    env: dict[str, str]
    cwd: Path
    proc: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        log = self.cwd / f"{self.name}.log"
        with open(log, "ab") as out:
            out.write(f"\n===== start #{self.starts} at {time.time():.3f}\n".encode())
            out.flush()
            self.proc = subprocess.Popen([legato_executable(), *self.args], cwd=self.cwd, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> float:
        """SIGKILL (no clean-up, no commit, no leave-group); returns the wall-clock time of the kill."""
        assert self.proc is not None
        t = time.time()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        return t

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.cwd / f"{self.name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Env:
    """A fresh prefix and data dirs in a temp dir (the workflows and handlers come from chaos_data/), and the processes
    started there."""

    def __init__(self, bootstrap: str, workdir: Path | None = None, partitions: int = 8, extra_env: dict[str, str] | None = None,
                 loglevel: str = "warning"):
        self.bootstrap = bootstrap
        self.prefix = f"chaos{uuid.uuid4().hex[:10]}"
        self.partitions = partitions
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="legato-chaos-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LEGATO_")},
            "LEGATO_BOOTSTRAP": bootstrap,
            "LEGATO_TOPIC_PREFIX": self.prefix,
            "LEGATO_PARTITIONS": str(partitions),
            "LEGATO_WORKFLOWS": str(DATA),
            "LEGATO_HANDLERS": HANDLERS_MODULE,
            "LEGATO_LOGLEVEL": loglevel,
            "PYTHONPATH": os.pathsep.join([str(DATA), str(REPO_ROOT)]),
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        from legato.topics.names import Topics

        self.topics = Topics(self.prefix)

    def settings(self) -> Settings:
        return Settings(bootstrap=self.bootstrap, prefix=self.prefix, partitions=self.partitions)

    async def create_topics(self) -> None:
        from legato.streams.admin import ensure_topics
        await ensure_topics(self.bootstrap, self.topics, ACTIVITIES, self.partitions, compacted=[self.topics.changelog])

    def process(self, role: str, name: str | None = None, env: dict[str, str] | None = None) -> Proc:
        name = name or role
        data = self.workdir / f"data-{name}"
        data.mkdir(exist_ok=True)
        p = Proc(name, [role], {**self.env, "LEGATO_DATA_DIR": str(data), **(env or {})}, self.workdir)
        self.procs.append(p)
        p.start()
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in self.procs)


# --------------------------------------------------------------------------- reading topics


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    timestamp: int  # ms
    key: bytes | None
    value: bytes | None
    seen: float  # wall clock when read

    def json(self) -> Any:
        try:
            return orjson.loads(self.value) if self.value is not None else None
        except orjson.JSONDecodeError:
            return None


class Tail:
    """Every record of some topics from the beginning, read continuously without a consumer group.

    Reads committed records only, like every consumer of Legato's topics should (README, "Guarantees")."""

    def __init__(self, bootstrap: str, topics: list[str], **kafka: Any):
        self.bootstrap = bootstrap
        self.topics = topics
        self.kafka = kafka
        self.records: list[Rec] = []
        self.listeners: list[Callable[[Rec], None]] = []
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    async def start(self) -> "Tail":
        self._task = asyncio.ensure_future(self._run())
        await asyncio.wait_for(self._ready.wait(), 60)
        return self

    async def _run(self) -> None:
        consumer = kafka_io.reader(self.bootstrap, max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=16 * 1024 * 1024, **self.kafka)
        await consumer.start()
        try:
            await kafka_io.assign_all(consumer, self.topics, from_beginning=True, wait=60.0)
            self._ready.set()
            while True:
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                now = time.time()
                for tp, msgs in batch.items():
                    for m in msgs:
                        rec = Rec(m.topic, m.partition, m.offset, m.timestamp, m.key, m.value, now)
                        self.records.append(rec)
                        for fn in self.listeners:
                            fn(rec)
        finally:
            await consumer.stop()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass


class RunWatch:
    """Run events by run_id (terminal ones counted, duplicates included)."""

    def __init__(self, tail: Tail):
        self.terminal: dict[str, list[dict]] = defaultdict(list)
        self.terminal_recs: dict[str, list[Rec]] = defaultdict(list)
        self.started: Counter = Counter()
        self.by_partition: dict[int, list[Rec]] = defaultdict(list)
        tail.listeners.append(self._on)

    def _on(self, rec: Rec) -> None:
        value = rec.json()
        if not isinstance(value, dict):
            return
        self.by_partition[rec.partition].append(rec)
        if value.get("type") in TERMINAL:
            self.terminal[value["run_id"]].append(value)
            self.terminal_recs[value["run_id"]].append(rec)
        elif value.get("type") == "run.started":
            self.started[value["run_id"]] += 1

    def done(self, run_ids: set[str] | list[str]) -> int:
        return sum(1 for r in run_ids if r in self.terminal)

    async def wait(self, run_ids: set[str], timeout: float, procs: list[Proc] | None = None, progress: Callable[[str], None] | None = None) -> bool:
        deadline = time.monotonic() + timeout
        last = 0.0
        while time.monotonic() < deadline:
            if self.done(run_ids) == len(run_ids):
                return True
            if progress and time.monotonic() - last > 10:
                last = time.monotonic()
                progress(f"  … {self.done(run_ids)}/{len(run_ids)} runs finished")
            await asyncio.sleep(0.2)
        return False


def count_by_request(records: list[Rec]) -> Counter:
    c: Counter = Counter()
    for r in records:
        v = r.json()
        if isinstance(v, dict) and isinstance(v.get("request_id"), str):
            c[v["request_id"]] += 1
    return c


class Scene:
    """What a scenario drives and reads through: its topics created, ``<prefix>.runs`` watched, ``other`` topics
    tailed and a producer. Leaving it stops them and every process the scenario started in ``env``."""

    def __init__(self, env: Env, other: list[str] | None = None):
        self.env = env
        self.other_topics = other or []
        self.tail: Tail | None = None
        self.other: Tail | None = None
        self.prod: Any = None

    async def __aenter__(self) -> "Scene":
        try:
            await self.env.create_topics()
            self.tail = await Tail(self.env.bootstrap, [self.env.topics.runs]).start()
            self.watch = RunWatch(self.tail)
            if self.other_topics:
                self.other = await Tail(self.env.bootstrap, self.other_topics).start()
            self.prod = await producer(self.env.bootstrap)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for x in (self.prod, self.tail, self.other):
            if x is not None:
                await x.stop()
        self.env.stop_all()

    def judge(self, expected: dict[str, Any]) -> dict[str, Any]:
        """``judge`` over the runs watched and the completions and requests tailed."""
        records = self.other.records if self.other is not None else []
        completions = self.env.topics.completions
        return judge(expected, self.watch, [r for r in records if r.topic == completions], [r for r in records if r.topic != completions])


def judge(run_ids: dict[str, Any], watch: RunWatch, completions: list[Rec], requests: list[Rec]) -> dict[str, Any]:
    """What happened to the runs: completed, lost, wrong output, duplicate terminal events and executions."""
    ours = set(run_ids)
    lost = sorted(r for r in ours if r not in watch.terminal)
    dup_terminal = sum(len(watch.terminal[r]) - 1 for r in ours if r in watch.terminal)
    conflicting = sorted(r for r in ours if len({e["status"] for e in watch.terminal.get(r, [])}) > 1)
    wrong = []
    for r, expected in run_ids.items():
        events = watch.terminal.get(r)
        if not events:
            continue
        first = events[0]
        if expected is not None and (first["status"] != "succeeded" or first.get("output") != expected):
            wrong.append((r, first.get("status"), first.get("output"), first.get("error")))
    prefix_of = lambda v: isinstance(v, dict) and v.get("run_id") in ours
    comp = count_by_request([c for c in completions if prefix_of(c.json())])
    reqs = count_by_request([c for c in requests if prefix_of(c.json())])
    failed = {r for r in ours if watch.terminal.get(r) and watch.terminal[r][0]["status"] == "failed"}
    return {
        "runs": len(ours),
        "completed": len(ours) - len(lost),
        "succeeded": sum(1 for r in ours if watch.terminal.get(r) and watch.terminal[r][0]["status"] == "succeeded"),
        "lost": len(lost),
        "lost_ids": lost[:10],
        "wrong_output": len(wrong),
        "wrong_examples": wrong[:3],
        "conflicting_terminal": len(conflicting),
        "duplicate_terminal_events": dup_terminal,
        "runs_with_duplicate_terminal": sum(1 for r in ours if len(watch.terminal.get(r, [])) > 1),
        "activity_requests": sum(reqs.values()),
        "distinct_requests": len(reqs),
        "reissued_requests": sum(v - 1 for v in reqs.values()),
        "executions": sum(comp.values()),
        "duplicate_executions": sum(v - 1 for v in comp.values()),
        "failed_answered_in_time": len(answered_in_time(failed, requests, completions)) if failed else 0,
    }


def answered_in_time(failed: set[str], requests: list[Rec], completions: list[Rec]) -> list[dict[str, Any]]:
    """The failed runs among ``failed`` in which a worker answered a request before that request's deadline (the
    request record's ``deadline``: when its step's timeout was due). Such a run failed although its worker was in
    time: the guarantee is that there are none. One entry per run, with the first such answer."""
    deadlines: dict[str, list[tuple[int, int]]] = defaultdict(list)  # request_id -> (record time, deadline) of each copy sent
    for r in requests:
        v = r.json()
        if isinstance(v, dict) and v.get("run_id") in failed and isinstance(v.get("request_id"), str) and isinstance(v.get("deadline"), int):
            deadlines[v["request_id"]].append((r.timestamp, v["deadline"]))
    out: dict[str, dict[str, Any]] = {}
    for c in completions:
        v = c.json()
        if not isinstance(v, dict) or v.get("run_id") not in failed or v["run_id"] in out:
            continue
        if any(sent <= c.timestamp <= deadline for sent, deadline in deadlines.get(v.get("request_id"), ())):
            out[v["run_id"]] = {"run_id": v["run_id"], "request_id": v["request_id"], "answered_ms": c.timestamp}
    return list(out.values())


async def producer(bootstrap: str, **kafka: Any):
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=8 * 1024 * 1024, **kafka)
    await p.start()
    return p


async def trigger(prod: Any, env: Env, workflow: str, input: dict, run_id: str) -> Any:
    """Publish a trigger and wait for the broker's ack, retrying: a run the harness failed to trigger is not a
    run Legato lost. (The run_id is the idempotency key, so a retried trigger cannot start a second run.)"""
    value = orjson.dumps({"workflow": workflow, "input": input, "run_id": run_id})
    for attempt in range(10):
        try:
            return await prod.send_and_wait(env.topics.triggers, value, key=run_id.encode())
        except Exception:
            if attempt == 9:
                raise
            await asyncio.sleep(0.5)


async def wait_ready(env: Env, prod: Any, watch: RunWatch, procs: list[Proc], timeout: float = 120.0) -> float:
    """Probe runs until one completes: every process is up and consuming. Returns seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited during start-up:\n{p.log_tail()}")
        rid = f"probe-{uuid.uuid4().hex[:8]}"
        await trigger(prod, env, "chaos_probe", {}, rid)
        for _ in range(50):
            if rid in watch.terminal:
                return time.monotonic() - t0
            await asyncio.sleep(0.2)
    raise RuntimeError(f"processes not ready after {timeout}s:\n{env.logs()}")


# --------------------------------------------------------------------------- scenarios


async def scenario_coordinator(bootstrap: str, runs: int = 2000, kills: int = 5, rate: float = 40.0, seed: int = 1,
                               extra_env: dict[str, str] | None = None, timeout: float = 900.0, say: Callable[[str], None] = print,
                               workdir: Path | None = None) -> dict[str, Any]:
    """N chaos_mix runs triggered at ``rate``/s; the coordinator SIGKILLed at random moments ``kills`` times and restarted."""
    rnd = random.Random(seed)
    env = Env(bootstrap, workdir, extra_env=extra_env)
    t0 = time.time()
    kill_log: list[dict] = []
    async with Scene(env, [env.topics.completions, env.topics.requests("chaos_echo")]) as scene:
        coord, worker = env.process("coordinator"), env.process("worker")
        watch, prod = scene.watch, scene.prod
        ready = await wait_ready(env, prod, watch, [coord, worker])
        say(f"  processes ready after {ready:.1f}s (prefix {env.prefix}, logs {env.workdir})")
        expected = {f"mix-{i}": mix_expected(i) for i in range(runs)}
        ids = list(expected)
        window = runs / rate
        # random moments within the trigger window (and a little after), at least 8 s apart so each restart counts
        moments = sorted(rnd.uniform(1.0, window + 5.0) for _ in range(kills))
        for i in range(1, len(moments)):
            moments[i] = max(moments[i], moments[i - 1] + 8.0)
        start = time.monotonic()

        async def produce_all() -> None:
            for i, rid in enumerate(ids):
                target = start + i / rate
                delay = target - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await trigger(prod, env, "chaos_mix", {"n": i}, rid)
            await prod.flush()

        async def chaos() -> None:
            resumed_at = 0
            for m in moments:
                delay = start + m - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                # kill a coordinator that is serving, not one still recovering from the last kill: wait until it has
                # finished runs again (bounded), then a random extra 0-3 s
                waited = time.monotonic()
                while kill_log and watch.done(ids) < min(runs, resumed_at + 20) and time.monotonic() - waited < 300:
                    await asyncio.sleep(0.1)
                await asyncio.sleep(rnd.uniform(0.0, 3.0))
                done_before = watch.done(ids)
                t_kill = coord.kill()
                down = rnd.uniform(0.0, 2.0)
                await asyncio.sleep(down)
                coord.start()
                resumed_at = watch.done(ids)
                kill_log.append({"at_s": round(t_kill - t0, 1), "finished_before": done_before, "down_s": round(down, 2)})
                say(f"  SIGKILL coordinator at +{t_kill - t0:.1f}s ({done_before}/{runs} finished), restarted after {down:.1f}s")

        await asyncio.gather(produce_all(), chaos())
        finished = await watch.wait(set(ids), timeout, progress=say)
        await asyncio.sleep(5.0)  # let late duplicates arrive
        elapsed = time.time() - t0
        result = scene.judge(expected)
        result.update({"scenario": "coordinator", "kills": len(kill_log), "kill_log": kill_log, "elapsed_s": round(elapsed, 1),
                       "all_finished": finished, "processes_alive": coord.alive() and worker.alive(), "rate": rate, "prefix": env.prefix})
        return result


async def scenario_worker(bootstrap: str, runs: int = 20, seconds: float = 4.0, extra_env: dict[str, str] | None = None,
                          timeout: float = 300.0, say: Callable[[str], None] = print, workdir: Path | None = None) -> dict[str, Any]:
    """Runs whose activity takes ``seconds``; the worker is SIGKILLed while every one is in its handler, then restarted."""
    env = Env(bootstrap, workdir, extra_env=extra_env)
    async with Scene(env, [env.topics.completions, env.topics.requests("chaos_slow")]) as scene:
        coord, worker = env.process("coordinator"), env.process("worker")
        watch, other, prod = scene.watch, scene.other, scene.prod
        await wait_ready(env, prod, watch, [coord, worker])
        expected = {f"slow-{i}": {"tag": f"t{i}", "attempt": None} for i in range(runs)}
        for i, rid in enumerate(expected):
            await trigger(prod, env, "chaos_slow", {"seconds": seconds, "tag": f"t{i}"}, rid)
        await prod.flush()
        # all requests issued and picked up (the handler sleeps `seconds`): kill in the middle of the activities
        while sum(1 for r in other.records if r.topic != env.topics.completions and (r.key or b"").startswith(b"slow-")) < runs:
            await asyncio.sleep(0.1)
        await asyncio.sleep(min(1.5, seconds / 2))
        t_kill = worker.kill()
        completions_at_kill = sum(1 for r in other.records if r.topic == env.topics.completions and (r.key or b"").startswith(b"slow-"))
        worker.start()
        say(f"  SIGKILL worker with {runs - completions_at_kill} activities in flight; restarted")
        finished = await watch.wait(set(expected), timeout, progress=say)
        await asyncio.sleep(2.0)
        res = scene.judge({k: None for k in expected})
        ends = [watch.terminal_recs[r][0].timestamp / 1000 for r in expected if r in watch.terminal_recs]
        attempts = Counter(watch.terminal[r][0].get("output", {}).get("attempt") for r in expected if r in watch.terminal)
        wrong = [r for r in expected if r in watch.terminal and (watch.terminal[r][0]["status"] != "succeeded"
                                                                 or watch.terminal[r][0]["output"]["tag"] != expected[r]["tag"])]
        res.update({"scenario": "worker", "kills": 1, "in_flight_at_kill": runs - completions_at_kill, "all_finished": finished,
                    "wrong_output": len(wrong), "recovery_s": round(max(ends) - t_kill, 1) if ends else None,
                    "step_attempts": dict(attempts), "processes_alive": coord.alive() and worker.alive(), "prefix": env.prefix})
        return res


async def scenario_takeover(bootstrap: str, runs: int = 400, rate: float = 20.0, extra_env: dict[str, str] | None = None,
                            timeout: float = 600.0, say: Callable[[str], None] = print, workdir: Path | None = None) -> dict[str, Any]:
    """Two coordinators share 8 partitions; one is SIGKILLed for good mid-load. Takeover time: for each partition of
    ``<prefix>.runs``, the first record written after the kill; the takeover time is the largest of these gaps (the
    partitions the survivor already owned answer at once, the dead one's answer once the survivor has rebuilt their
    run tables from the changelog and serves them)."""
    env = Env(bootstrap, workdir, extra_env={"CHAOS_DELAY": "0.05", **(extra_env or {})})
    async with Scene(env, [env.topics.completions, env.topics.requests("chaos_echo")]) as scene:
        c1, c2 = env.process("coordinator", "coordinator-a"), env.process("coordinator", "coordinator-b")
        worker = env.process("worker")
        watch, prod = scene.watch, scene.prod
        await wait_ready(env, prod, watch, [c1, c2, worker])
        members = await group_members(bootstrap, env.topics.coordinator_group, want=2)
        say(f"  coordinator group has {members} members")
        expected = {f"take-{i}": mix_expected(i) for i in range(runs)}
        ids = list(expected)
        start = time.monotonic()
        kill_at = runs / rate / 2
        t_kill = 0.0

        async def produce_all() -> None:
            for i, rid in enumerate(ids):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await trigger(prod, env, "chaos_mix", {"n": i}, rid)
            await prod.flush()

        async def kill() -> None:
            nonlocal t_kill
            await asyncio.sleep(kill_at)
            t_kill = c2.kill()
            say(f"  SIGKILL coordinator-b at +{kill_at:.0f}s ({watch.done(ids)}/{runs} finished); not restarted")

        await asyncio.gather(produce_all(), kill())
        finished = await watch.wait(set(ids), timeout, progress=say)
        await asyncio.sleep(3.0)
        gaps = {}
        for p, recs in sorted(watch.by_partition.items()):
            after = [r.timestamp / 1000 for r in recs if r.timestamp / 1000 > t_kill]
            gaps[p] = round(min(after) - t_kill, 2) if after else None
        res = scene.judge(expected)
        known = [g for g in gaps.values() if g is not None]
        res.update({"scenario": "takeover", "kills": 1, "takeover_s": max(known) if known else None, "gap_by_partition_s": gaps,
                    "all_finished": finished, "processes_alive": c1.alive() and worker.alive(), "prefix": env.prefix})
        return res


async def group_members(bootstrap: str, group: str, want: int, timeout: float = 120.0) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            groups = [g for resp in await admin.describe_consumer_groups([group]) for g in resp.groups]
            # (error_code, group_id, state, protocol_type, protocol, members, ...)
            n = len(groups[0][5]) if groups else 0
            state = groups[0][2] if groups else ""
            if n >= want and state == "Stable":
                return n
            await asyncio.sleep(0.5)
        return n
    finally:
        await admin.close()


async def scenario_timers(bootstrap: str, runs: int = 10, extra_env: dict[str, str] | None = None, timeout: float = 300.0,
                          say: Callable[[str], None] = print, workdir: Path | None = None) -> dict[str, Any]:
    """chaos_timer runs wait on an activity nobody serves: only timers can finish them. The coordinator is killed
    while every run's step timeout is pending and stays down past its due time; restarted; killed again while every
    run's retry back-off is pending and down past it; restarted. Every run must still end (by the on_error default
    after the second attempt's timeout), and each attempt's request must have been issued."""
    env = Env(bootstrap, workdir, extra_env=extra_env)
    changelog = env.topics.changelog
    states: dict[str, dict] = {}
    async with Scene(env) as scene:
        coord = env.process("coordinator")
        worker = env.process("worker")  # serves chaos_probe's chaos_echo only
        watch, prod = scene.watch, scene.prod
        await wait_ready(env, prod, watch, [coord, worker])
        ct = await Tail(bootstrap, [changelog, env.topics.requests("chaos_nobody")]).start()

        def on_state(rec: Rec) -> None:
            if rec.topic == changelog and rec.key and rec.key.startswith(b"timer-"):
                v = rec.json()
                if isinstance(v, dict):
                    states[rec.key.decode()] = v

        ct.listeners.append(on_state)
        ids = [f"timer-{i}" for i in range(runs)]
        for rid in ids:
            await trigger(prod, env, "chaos_timer", {}, rid)
        await prod.flush()
        phases = []
        for phase, pattern in (("step timeout", ":timeout:1"), ("retry back-off", ":retry:1")):
            deadline = time.monotonic() + timeout
            while not all(rid in states and any(pattern in t for t in states[rid].get("timers", {})) for rid in ids):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timers {pattern} never pending for all runs:\n{env.logs()}")
                await asyncio.sleep(0.05)
            due = max(t["due_ms"] for rid in ids for k, t in states[rid]["timers"].items() if pattern in k) / 1000
            t_kill = coord.kill()
            await asyncio.sleep(max(0.0, due - time.time()) + 1.0)
            t_restart = time.time()
            coord.start()
            phases.append({"phase": phase, "killed_s_before_due": round(due - t_kill, 2), "restarted_s_after_due": round(t_restart - due, 2)})
            say(f"  {phase}: SIGKILL {due - t_kill:.1f}s before the timers were due; restarted {t_restart - due:.1f}s after")
        finished = await watch.wait(set(ids), timeout, progress=say)
        await asyncio.sleep(1.0)
        attempts = Counter()
        for r in ct.records:
            v = r.json()
            if r.topic != changelog and isinstance(v, dict) and v.get("run_id") in ids:
                attempts[v["attempt"]] += 1
        ok = [r for r in ids if r in watch.terminal and watch.terminal[r][0]["status"] == "succeeded"
              and watch.terminal[r][0].get("output") == {"timed_out": True}]
        await ct.stop()
        return {"scenario": "timers", "runs": runs, "kills": 2, "phases": phases, "all_finished": finished,
                "completed": watch.done(ids), "lost": runs - watch.done(ids), "right_output": len(ok),
                "requests_by_attempt": dict(sorted(attempts.items())),
                "duplicate_terminal_events": sum(len(watch.terminal[r]) - 1 for r in ids if r in watch.terminal),
                "processes_alive": coord.alive(), "prefix": env.prefix}


async def send_all(prod: Any, topic: str, records: list[tuple[bytes, bytes]], chunk: int = 500) -> None:
    """Produce ``(key, value)`` records in batches, each batch acknowledged before the next; a record whose batch
    failed is sent again alone (retried like ``trigger``: what the harness failed to send is not a loss of Legato's)."""
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        futures = [await prod.send(topic, value, key=key) for key, value in part]
        results = await asyncio.gather(*futures, return_exceptions=True)
        for (key, value), result in zip(part, results):
            if isinstance(result, BaseException):
                for attempt in range(10):
                    try:
                        await prod.send_and_wait(topic, value, key=key)
                        break
                    except Exception:
                        if attempt == 9:
                            raise
                        await asyncio.sleep(0.5)


def _epoch_ms(iso: str | None) -> int | None:
    if not iso:
        return None
    return round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


async def scenario_waits(bootstrap: str, runs: int = 1000, extra_env: dict[str, str] | None = None, timeout: float = 900.0,
                         say: Callable[[str], None] = print, workdir: Path | None = None, spread_s: float = 10.0, lead_s: float | None = None) -> dict[str, Any]:
    """``runs`` chaos_wait runs wait for the signal ``go`` and ``runs`` chaos_sleep runs sleep until a due time of
    their own (spread over ``spread_s``). Once every one of them waits or sleeps (read from the changelog), the
    coordinator is SIGKILLed; it stays down until half the sleepers are due, and is restarted; then every waiting
    run is sent its signal (twice, with the same ``signal_id``, as a retrying sender would). Every waiting run must
    end with its signal's data, every sleeper after (never before) its due time; none lost, none ended twice."""
    env = Env(bootstrap, workdir, extra_env=extra_env)
    changelog = env.topics.changelog
    waiting: set[str] = set()
    sleeping: set[str] = set()
    async with Scene(env) as scene:
        coord = env.process("coordinator")
        worker = env.process("worker")  # serves chaos_probe's chaos_echo only
        watch, prod = scene.watch, scene.prod
        await wait_ready(env, prod, watch, [coord, worker])
        ct = await Tail(bootstrap, [changelog]).start()

        def on_state(rec: Rec) -> None:
            if rec.key is None or not (rec.key.startswith(b"wait-") or rec.key.startswith(b"sleep-")):
                return
            v = rec.json()
            if not isinstance(v, dict):
                return
            rid = rec.key.decode()
            if rid.startswith("wait-") and any(s.get("status") == "waiting" and s.get("signal") == "go" for s in v.get("steps", {}).values()):
                waiting.add(rid)
            elif rid.startswith("sleep-") and any(t.get("kind") == "sleep" for t in v.get("timers", {}).values()):
                sleeping.add(rid)

        ct.listeners.append(on_state)
        wait_ids = [f"wait-{i}" for i in range(runs)]
        sleep_ids = [f"sleep-{i}" for i in range(runs)]
        # the sleepers fall due from `lead` s on: time enough to start every run (on two shared cores) and kill
        lead = lead_s if lead_s is not None else 20.0 + runs * 0.02
        t0 = time.time()
        first_due_ms = round((t0 + lead) * 1000)
        due = {rid: first_due_ms + round(spread_s * 1000 * i / max(1, runs - 1)) for i, rid in enumerate(sleep_ids)}
        triggers = [(rid.encode(), orjson.dumps({"workflow": "chaos_wait", "input": {"n": i}, "run_id": rid})) for i, rid in enumerate(wait_ids)]
        triggers += [(rid.encode(), orjson.dumps({"workflow": "chaos_sleep", "input": {"n": i, "due_ms": due[rid]}, "run_id": rid}))
                     for i, rid in enumerate(sleep_ids)]
        await send_all(prod, env.topics.triggers, triggers)
        say(f"  {runs} waiting and {runs} sleeping runs triggered in {time.time() - t0:.1f}s (prefix {env.prefix}, logs {env.workdir})")
        deadline = time.monotonic() + timeout
        while len(waiting) < runs or len(sleeping | (set(sleep_ids) & set(watch.terminal))) < runs:  # (one that ended: judged below)
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(waiting)} runs waiting and {len(sleeping)} sleeping after {timeout}s:\n{env.logs()}")
            await asyncio.sleep(0.1)
        all_in_at = time.time()
        ended_before_kill = watch.done(wait_ids) + watch.done(sleep_ids)
        t_kill = coord.kill()
        asleep_at_kill = sum(1 for rid in sleep_ids if due[rid] > t_kill * 1000 and rid not in watch.terminal)
        say(f"  all waiting/sleeping {all_in_at - t0:.1f}s after the first trigger; SIGKILL coordinator with {asleep_at_kill} runs asleep "
            f"(first due in {first_due_ms / 1000 - t_kill:.1f}s)")
        # down until the first half of the sleepers has fallen due
        middle_ms = first_due_ms + round(spread_s * 500)
        await asyncio.sleep(max(1.0, middle_ms / 1000 - time.time()))
        t_restart = time.time()
        coord.start()
        due_while_down = sum(1 for d in due.values() if t_kill * 1000 < d <= t_restart * 1000)
        say(f"  restarted after {t_restart - t_kill:.1f}s down ({due_while_down} sleepers fell due meanwhile); sending {runs} signals, each twice")
        data = {rid: {"n": i, "run": rid, "token": uuid.uuid4().hex[:8]} for i, rid in enumerate(wait_ids)}
        signals = [(rid.encode(), orjson.dumps({"run_id": rid, "signal": "go", "data": data[rid], "signal_id": f"go-{rid}"})) for rid in wait_ids]
        t_signals = time.time()
        await send_all(prod, env.topics.signals, signals)
        await send_all(prod, env.topics.signals, signals)  # a retrying sender: the same signal_id again
        finished = await watch.wait(set(wait_ids) | set(sleep_ids), timeout, progress=say)
        await asyncio.sleep(3.0)  # let late duplicates arrive
        await ct.stop()
        expected: dict[str, Any] = {**data, **{rid: {"n": i, "due_ms": due[rid]} for i, rid in enumerate(sleep_ids)}}
        result = judge(expected, watch, [], [])
        early, late = [], []
        for rid in sleep_ids:
            events = watch.terminal.get(rid)
            if not events:
                continue
            ended_ms = _epoch_ms(events[0].get("finished_at"))
            record_ms = watch.terminal_recs[rid][0].timestamp
            if ended_ms is None or ended_ms < due[rid] or record_ms < due[rid]:
                early.append((rid, due[rid], ended_ms, record_ms))
            else:
                late.append((ended_ms - max(due[rid], round(t_restart * 1000))) / 1000)
        wait_ends = [_epoch_ms(watch.terminal[r][0].get("finished_at")) for r in wait_ids if watch.terminal.get(r)]
        ended_before_signal = sum(1 for ms in wait_ends if ms is not None and ms < t_signals * 1000)
        result.update({
            "scenario": "waits", "kills": 1, "waiting_runs": runs, "sleeping_runs": runs, "all_finished": finished,
            "ended_before_kill": ended_before_kill, "asleep_at_kill": asleep_at_kill, "due_while_down": due_while_down,
            "down_s": round(t_restart - t_kill, 1), "ended_early": len(early), "early_examples": early[:3],
            "waits_ended_before_their_signal": ended_before_signal,
            "sleep_late_s_max": round(max(late), 2) if late else None,
            "sleep_late_s_median": round(sorted(late)[len(late) // 2], 2) if late else None,
            "signals_sent": 2 * runs, "processes_alive": coord.alive(), "prefix": env.prefix,
        })
        return result


V1_STEPS = {"v1_prep", "v1_slow", "v1_done"}
V2_STEPS = {"v2_prep", "v2_slow", "v2_check", "v2_done"}
V2_FILE = DATA / "v2" / "chaos_deploy.yaml"
"""chaos_deploy v2, deployed by the ``deploy`` scenario with ``legato deploy`` while v1 runs are in flight."""


def deploy_expected(n: int, version: int) -> dict[str, Any]:
    return {"n": n, "version": 1, "tag": "v1"} if version == 1 else {"n": n, "version": 2, "tag": "v2", "checked": True}


async def scenario_deploy(bootstrap: str, runs: int = 1000, kills: int = 1, new_runs: int | None = None, seconds: float | None = None, seed: int = 1,
                          extra_env: dict[str, str] | None = None, timeout: float = 900.0, say: Callable[[str], None] = print,
                          workdir: Path | None = None) -> dict[str, Any]:
    """``runs`` chaos_deploy v1 runs (three steps, the middle one ``seconds`` long in a worker of 64 slots) are
    started; once every one has started with version 1, v2 (other step ids, one step more) is deployed with
    ``legato deploy``, and the coordinator is SIGKILLed ``kills`` times while v1 runs are still in flight (restarted
    after 0-2 s). ``new_runs`` triggers without a version follow the deploy, half before the first kill and half after
    the last restart. Judged from the topics: every run ends once with its version's output; every v1 run's events
    say ``version: 1`` and it only ever requested v1's step ids; every run triggered after the deploy is v2."""
    rnd = random.Random(seed)
    new_runs = max(10, runs // 10) if new_runs is None else new_runs
    # the worker runs 64 slow steps at a time: keep v1 runs in flight for about 20 s per kill (a restart takes ~12 s)
    seconds = max(2.0, round(20.0 * kills * 64 / runs, 1)) if seconds is None else seconds
    env = Env(bootstrap, workdir, extra_env=extra_env)
    t0 = time.time()
    kill_log: list[dict] = []
    started_version: dict[str, list[int]] = defaultdict(list)
    async with Scene(env, [env.topics.completions, env.topics.requests("chaos_echo"), env.topics.requests("chaos_slow")]) as scene:
        def on_run(rec: Rec) -> None:
            v = rec.json()
            if isinstance(v, dict) and v.get("type") == "run.started":
                started_version[v["run_id"]].append(v.get("version"))

        scene.tail.listeners.append(on_run)
        coord, worker = env.process("coordinator"), env.process("worker")
        watch, prod = scene.watch, scene.prod
        ready = await wait_ready(env, prod, watch, [coord, worker])
        say(f"  processes ready after {ready:.1f}s (prefix {env.prefix}, logs {env.workdir})")
        v1_ids = [f"v1-{i}" for i in range(runs)]
        await send_all(prod, env.topics.triggers, [(rid.encode(), orjson.dumps({"workflow": "chaos_deploy", "input": {"n": i, "seconds": seconds}, "run_id": rid}))
                                                   for i, rid in enumerate(v1_ids)])
        deadline = time.monotonic() + timeout
        while sum(1 for rid in v1_ids if rid in started_version) < runs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {sum(1 for r in v1_ids if r in started_version)} of {runs} v1 runs started:\n{env.logs()}")
            await asyncio.sleep(0.1)
        in_flight_at_deploy = runs - watch.done(v1_ids)
        say(f"  {runs} v1 runs started in {time.time() - t0:.1f}s, {in_flight_at_deploy} in flight; deploying v2 with legato deploy")
        deployed = await asyncio.to_thread(subprocess.run, [legato_executable(), "deploy", str(V2_FILE)], env=env.env, cwd=env.workdir,
                                           capture_output=True, text=True, timeout=120)
        if deployed.returncode != 0:
            raise RuntimeError(f"legato deploy failed: {deployed.stdout}{deployed.stderr}")
        t_deploy = time.time()
        # the coordinator follows the definitions topic: probe until a new run starts with v2 (then every later one does)
        probes: list[str] = []
        while not any(2 in started_version.get(p, []) for p in probes):
            if time.time() - t_deploy > 60:
                raise RuntimeError(f"no run started with v2 within 60 s of the deploy:\n{env.logs()}")
            probes.append(f"v2probe-{len(probes)}")
            await trigger(prod, env, "chaos_deploy", {"n": -len(probes), "seconds": 0}, probes[-1])
            await asyncio.sleep(0.3)
        seen_v2_s = time.time() - t_deploy
        new_ids = [f"v2-{i}" for i in range(new_runs)]
        first_half = new_runs // 2

        async def send_new(ids: list[str], offset: int) -> None:
            await send_all(prod, env.topics.triggers, [(rid.encode(), orjson.dumps({"workflow": "chaos_deploy", "input": {"n": offset + i, "seconds": seconds},
                                                                                    "run_id": rid})) for i, rid in enumerate(ids)])

        await send_new(new_ids[:first_half], 0)
        resumed_at = 0
        for k in range(kills):
            # kill a coordinator that is serving (after the first kill: once it has finished runs again), with v1 runs in flight
            waited = time.monotonic()
            while k and watch.done(v1_ids) < min(runs, resumed_at + 20) and time.monotonic() - waited < 300:
                await asyncio.sleep(0.1)
            await asyncio.sleep(rnd.uniform(0.5, 2.0))
            v1_in_flight = runs - watch.done(v1_ids)
            t_kill = coord.kill()
            down = rnd.uniform(0.0, 2.0)
            await asyncio.sleep(down)
            coord.start()
            resumed_at = watch.done(v1_ids)
            kill_log.append({"at_s": round(t_kill - t0, 1), "v1_in_flight": v1_in_flight, "down_s": round(down, 2)})
            say(f"  SIGKILL coordinator at +{t_kill - t0:.1f}s with {v1_in_flight}/{runs} v1 runs in flight, restarted after {down:.1f}s")
        await send_new(new_ids[first_half:], first_half)
        await prod.flush()
        finished = await watch.wait(set(v1_ids) | set(new_ids) | set(probes), timeout, progress=say)
        await asyncio.sleep(5.0)  # let late duplicates arrive
        expected = {rid: deploy_expected(i, 1) for i, rid in enumerate(v1_ids)}
        expected.update({rid: deploy_expected(i, 2) for i, rid in enumerate(new_ids)})
        expected.update({rid: None for rid in probes})
        result = scene.judge(expected)
        steps_of: dict[str, set[str]] = defaultdict(set)
        for r in scene.other.records:
            v = r.json()
            if r.topic != env.topics.completions and isinstance(v, dict) and isinstance(v.get("step_id"), str):
                steps_of[v.get("run_id")].add(v["step_id"])

        def switched(rid: str, version: int, steps: set[str]) -> bool:
            """Started, ended or requested anything other than ``version``'s."""
            events = watch.terminal.get(rid, [])
            return (set(started_version.get(rid, [])) != {version} or any(e.get("version") != version for e in events)
                    or not steps_of.get(rid) or not steps_of[rid] <= steps)

        v1_switched = sorted(rid for rid in v1_ids if switched(rid, 1, V1_STEPS))
        new_not_v2 = sorted(rid for rid in new_ids if switched(rid, 2, V2_STEPS))
        elapsed = time.time() - t0
        result.update({
            "scenario": "deploy", "kills": len(kill_log), "v1_runs": runs, "v2_runs": new_runs, "v1_in_flight_at_deploy": in_flight_at_deploy,
            "deployed": deployed.stdout.strip(), "v2_seen_s_after_deploy": round(seen_v2_s, 2), "probes": len(probes),
            "switched_version": len(v1_switched), "switched_examples": [(r, started_version.get(r), sorted(steps_of.get(r, ()))) for r in v1_switched[:3]],
            "new_not_v2": len(new_not_v2), "new_not_v2_examples": [(r, started_version.get(r), sorted(steps_of.get(r, ()))) for r in new_not_v2[:3]],
            "kill_log": kill_log, "elapsed_s": round(elapsed, 1), "all_finished": finished,
            "processes_alive": coord.alive() and worker.alive(), "seconds": seconds, "prefix": env.prefix,
        })
        return result


# --------------------------------------------------------------------------- a private broker


class PrivateBroker:
    """A single-node KRaft broker with its own port, data dir and config, reusing the local broker's jars.

    ``sasl_users`` ({user: password}) puts the client listener on SASL_PLAINTEXT with PLAIN and SCRAM-SHA-256/512;
    the controller listener stays PLAINTEXT on 127.0.0.1.
    """

    def __init__(self, port: int | None = None, workdir: Path | None = None, sasl_users: dict[str, str] | None = None, heap: str = "-Xmx384m"):
        from legato.tools import kafka_local

        self.kl = kafka_local
        self.port = port or free_port_pair()
        self.cport = self.port + 1  # the controller's
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="legato-broker-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sasl_users = sasl_users
        self.heap = heap
        self.proc: subprocess.Popen | None = None
        self.cluster_id = "-"
        while self.cluster_id.startswith("-"):  # an id starting with '-' is read as an option by kafka-storage
            self.cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self._formatted = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def properties(self) -> str:
        text = self.kl.server_properties(self.bootstrap, self.dir / "data")
        if not self.sasl_users:
            return text
        admin_pw = self.sasl_users.get("admin") or "admin-" + uuid.uuid4().hex
        users = {"admin": admin_pw, **self.sasl_users}
        plain_users = " ".join(f'user_{u}="{p}"' for u, p in users.items())
        replace = {
            "listeners": f"SASL_PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.cport}",
            "advertised.listeners": f"SASL_PLAINTEXT://127.0.0.1:{self.port}",
            "inter.broker.listener.name": "SASL_PLAINTEXT",
            "listener.security.protocol.map": "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
        }
        lines = []
        for line in text.splitlines():
            k = line.split("=", 1)[0]
            lines.append(f"{k}={replace[k]}" if k in replace else line)
        scram = 'org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="%s";' % admin_pw
        lines += [
            "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            "sasl.mechanism.inter.broker.protocol=PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule "
            f'required username="admin" password="{admin_pw}" {plain_users};',
            f"listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config={scram}",
            f"listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config={scram}",
        ]
        return "\n".join(lines) + "\n"

    def _jvm(self) -> list[str]:
        return [self.kl._java(), "-Xms128m", self.heap, "-XX:+UseG1GC", "-Djava.awt.headless=true",
                f"-Dlog4j.configuration=file:{self.dir / 'log4j.properties'}", f"-Dkafka.logs.dir={self.dir}",
                "-cp", str(self.kl.libs_dir() / "*")]

    def start(self, timeout: float = 120.0) -> None:
        if not self.kl.jars_present():
            self.kl.fetch_jars()
        props = self.dir / "server.properties"
        props.write_text(self.properties())
        (self.dir / "log4j.properties").write_text(self.kl._log4j_properties(self.dir / "broker.log"))
        if not self._formatted:
            cmd = [*self._jvm(), "kafka.tools.StorageTool", "format", "-t", self.cluster_id, "-c", str(props), "--ignore-formatted"]
            if self.sasl_users:  # SCRAM credentials are stored in the cluster metadata at format time
                for user, pw in self.sasl_users.items():
                    for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                        cmd += ["--add-scram", f"{mech}=[name={user},password={pw}]"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
            if proc.returncode != 0:
                raise RuntimeError(f"formatting the private broker failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
            self._formatted = True
        with open(self.dir / "broker.out", "ab") as out:
            self.proc = subprocess.Popen([*self._jvm(), "kafka.Kafka", str(props)], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"private broker exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self.sasl_users:
                if self.kl._port_open("127.0.0.1", self.port):
                    time.sleep(2.0)  # the listener is up; clients retry their own connects
                    return
            elif self.kl.broker_alive(self.bootstrap, 2.0):
                return
            time.sleep(0.5)
        raise RuntimeError(f"private broker did not come up in {timeout}s:\n{self.log_tail()}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(45)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for name in ("broker.out", "broker.log"):
            try:
                out += (self.dir / name).read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                pass
        return "\n".join(out)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


async def scenario_broker(bootstrap: str | None = None, runs: int = 200, down_s: float = 5.0, extra_env: dict[str, str] | None = None,
                          timeout: float = 600.0, say: Callable[[str], None] = print, workdir: Path | None = None) -> dict[str, Any]:
    """A private broker is stopped (SIGTERM) in the middle of runs and started again; nobody restarts the Legato
    processes. Half of the runs are triggered before the outage, half after it."""
    broker = PrivateBroker()
    await asyncio.to_thread(broker.start)
    say(f"  private broker at {broker.bootstrap} (data {broker.dir})")
    env = Env(broker.bootstrap, workdir, extra_env={"CHAOS_DELAY": "0.05", **(extra_env or {})})
    try:
        async with Scene(env, [env.topics.completions, env.topics.requests("chaos_echo")]) as scene:
            return await _broker_outage(env, scene, broker, runs, down_s, timeout, say)
    finally:
        await asyncio.to_thread(broker.cleanup)


async def _broker_outage(env: Env, scene: Scene, broker: "PrivateBroker", runs: int, down_s: float, timeout: float,
                         say: Callable[[str], None]) -> dict[str, Any]:
    coord, worker = env.process("coordinator"), env.process("worker")
    pids = (coord.proc.pid, worker.proc.pid)
    watch, prod = scene.watch, scene.prod
    await wait_ready(env, prod, watch, [coord, worker])
    expected = {f"brk-{i}": mix_expected(i) for i in range(runs)}
    ids = list(expected)
    half = runs // 2
    for i in range(half):
        await trigger(prod, env, "chaos_mix", {"n": i}, ids[i])
    await prod.flush()
    await asyncio.sleep(1.0)
    before = watch.done(ids)
    t_stop = time.time()
    await asyncio.to_thread(broker.stop)
    say(f"  broker stopped with {before}/{half} runs finished; down for {down_s}s")
    await asyncio.sleep(down_s)
    await asyncio.to_thread(broker.start)
    t_back = time.time()
    say(f"  broker back after {t_back - t_stop:.1f}s")
    for i in range(half, runs):
        await trigger(prod, env, "chaos_mix", {"n": i}, ids[i])
    await prod.flush()
    finished = await watch.wait(set(ids), timeout, progress=say)
    await asyncio.sleep(2.0)
    res = scene.judge(expected)
    ends = sorted(watch.terminal_recs[r][0].timestamp / 1000 for r in ids[:half] if r in watch.terminal_recs)
    res.update({"scenario": "broker", "kills": 1, "finished_before_outage": before, "all_finished": finished,
                "outage_s": round(t_back - t_stop, 1),
                "first_half_done_s_after_back": round(ends[-1] - t_back, 1) if ends and ends[-1] > t_back else 0.0,
                "processes_alive": coord.alive() and worker.alive(),
                "same_pids": (coord.proc.pid, worker.proc.pid) == pids and coord.starts == 1 and worker.starts == 1,
                "prefix": env.prefix})
    return res


# --------------------------------------------------------------------------- fuzzing


@dataclass
class Bad:
    topic: str  # "triggers" | "completions"
    category: str
    key: bytes | None
    value: bytes | None
    expect: str  # "dlq" | "ignored" | "failed_run" | "refused" (by the broker)


def bad_message_strategy(known_runs: list[str]):
    """A hypothesis strategy of bad messages for ``legato.triggers`` and ``legato.completions``."""
    from hypothesis import strategies as st

    text = st.text(max_size=40)
    ints = st.integers(-(2**53), 2**53)  # JSON numbers orjson can write
    json_scalar = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False, allow_infinity=False), text)
    json_any = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=10)
    not_object = json_any.filter(lambda v: not isinstance(v, dict))
    key = st.one_of(st.none(), st.binary(max_size=16), st.text(max_size=16).map(str.encode),
                    st.binary(min_size=1, max_size=16).map(lambda b: b"\xff" + b))  # \xff is never UTF-8
    run_id = st.one_of(st.sampled_from(known_runs or ["x"]), st.uuids().map(str))
    good_completion = st.fixed_dictionaries({
        "request_id": text, "run_id": run_id, "step_id": text, "attempt": st.integers(1, 10**6),
        "status": st.sampled_from(["succeeded", "failed"]), "output": json_any})

    def b(v: Any) -> bytes:
        return orjson.dumps(v)

    def deep(depth: int) -> bytes:
        return b'{"workflow":"chaos_mix","input":{"n":' + b"[" * depth + b"1" + b"]" * depth + b"}}"

    strategies = [
        # triggers
        st.builds(lambda k, v: Bad("triggers", "random bytes", k, b"\xff" + v, "dlq"), key, st.binary(max_size=64)),
        st.builds(lambda k, v: Bad("triggers", "non-JSON text", k, ("{" + v).encode(), "dlq"), key, text),
        st.builds(lambda k, v: Bad("triggers", "JSON, not an object", k, b(v), "dlq"), key, not_object),
        st.builds(lambda k, w, i: Bad("triggers", "wrong types", k, b({"workflow": w, "input": i}), "dlq"), key,
                  st.one_of(ints, st.none(), st.lists(ints, max_size=2), st.just("")), st.one_of(ints, text, st.lists(ints))),
        st.builds(lambda k, v: Bad("triggers", "missing fields", k, b(v), "dlq"), key,
                  st.dictionaries(st.sampled_from(["input", "run_id", "correlation_id", "flow"]), st.dictionaries(text, json_scalar, max_size=2), max_size=3)),
        st.builds(lambda k, w, i: Bad("triggers", "unknown workflow", k, b({"workflow": "nope_" + w, "input": i}), "failed_run"), key,
                  st.from_regex(r"[a-z0-9_]{1,20}", fullmatch=True), st.dictionaries(text, json_scalar, max_size=3)),
        st.builds(lambda k: Bad("triggers", "empty value (null)", k or b"k", None, "dlq"), key),  # a record needs a key or a value
        st.builds(lambda d: Bad("triggers", "deeply nested JSON", None, deep(d), "dlq"), st.integers(1100, 5000)),
        st.builds(lambda k: Bad("triggers", "non-UTF-8 key", k, b"\xfe\xfe not json", "dlq"), st.binary(min_size=1, max_size=8).map(lambda x: b"\xff" + x)),
        # completions
        st.builds(lambda k, v: Bad("completions", "random bytes", k, b"\xff" + v, "dlq"), key, st.binary(max_size=64)),
        st.builds(lambda k, v: Bad("completions", "non-JSON text", k, ("[" + v).encode(), "dlq"), key, text),
        st.builds(lambda k, v: Bad("completions", "JSON, not an object", k, b(v), "dlq"), key, not_object),
        st.builds(lambda c, f, v: Bad("completions", "wrong types", c["run_id"].encode(), b({**c, f: v}), "dlq"), good_completion,
                  st.sampled_from(["attempt", "status", "request_id", "run_id"]), st.one_of(st.none(), st.lists(ints, max_size=2), st.just(-1), st.just({"a": 1}))),
        st.builds(lambda c, f: Bad("completions", "missing fields", c["run_id"].encode(), b({k: v for k, v in c.items() if k != f}), "dlq"),
                  good_completion, st.sampled_from(["request_id", "run_id", "step_id", "status"])),
        st.builds(lambda c: Bad("completions", "unknown run", str(uuid.UUID(int=abs(hash(c["request_id"])) % 2**128)).encode(),
                                None, "ignored"), good_completion),
        st.builds(lambda c: Bad("completions", "unknown request / stale attempt", c["run_id"].encode(), b(c), "ignored"),
                  good_completion.filter(lambda c: c["run_id"] in known_runs) if known_runs else good_completion),
        st.builds(lambda d: Bad("completions", "deeply nested JSON", None, b'{"request_id":' + b"[" * d + b"]" * d + b"}", "dlq"), st.integers(1100, 5000)),
        st.builds(lambda c: Bad("completions", "non-UTF-8 key", b"\xff\xfe" + c["run_id"].encode(), b"\xff garbage", "dlq"), good_completion),
    ]
    return st.one_of(strategies)


def finish_bad(bad: Bad) -> Bad:
    """Fill in what a strategy could not build lazily (unknown-run completions get a value keyed by their key)."""
    if bad.category == "unknown run" and bad.value is None:
        rid = bad.key.decode()
        bad.value = orjson.dumps({"request_id": f"{rid}/x/1", "run_id": rid, "step_id": "x", "attempt": 1, "status": "succeeded", "output": 1})
    return bad


def oversize(topic: str) -> Bad:
    return Bad(topic, "payload over the size limit", b"big", b'{"workflow":"chaos_mix","input":{"pad":"' + b"x" * (1024 * 1024 + 64) + b'"}}', "refused")


def blowups() -> list[Bad]:
    """Messages under the broker's limit whose dead letter is over it (JSON escaping / base64 expansion)."""
    return [Bad("triggers", "dead letter over the limit (control chars)", b"esc", b"\x01" * 200_000, "dlq"),
            Bad("completions", "dead letter over the limit (non-UTF-8)", b"b64", b"\xff" * 900_000, "dlq")]


def generate_bad(count: int, known_runs: list[str], seed: int = 0) -> list[Bad]:
    """``count`` bad messages drawn by hypothesis (deterministically for a seed)."""
    from hypothesis import HealthCheck, Phase, given, seed as hseed, settings

    out: list[Bad] = []

    @hseed(seed)
    @settings(max_examples=count, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(bad_message_strategy(known_runs))
    def collect(bad: Bad) -> None:
        out.append(finish_bad(bad))

    while len(out) < count:
        collect()
    return out[:count]


def scrape(port: int) -> dict[str, float]:
    """Prometheus text → {sample with labels: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def metric_sum(samples: dict[str, float], name: str, label_filter: Callable[[str], bool] = lambda s: True) -> float:
    return sum(v for k, v in samples.items() if k.startswith(name + "{") and label_filter(k) or k == name)


async def scenario_fuzz(bootstrap: str, bad: int = 10_000, valid: int = 500, seed: int = 0, extra_env: dict[str, str] | None = None,
                        timeout: float = 900.0, with_blowups: bool = True, say: Callable[[str], None] = print, workdir: Path | None = None) -> dict[str, Any]:
    """``bad`` generated bad messages interleaved with ``valid`` chaos_mix runs and three misbehaving handlers."""
    port = free_port()
    env = Env(bootstrap, workdir, extra_env=extra_env)
    async with Scene(env, [env.topics.dlq]) as scene:
        coord = env.process("coordinator", env={"LEGATO_METRICS_PORT": str(port)})
        worker = env.process("worker")
        watch, dlq, prod = scene.watch, scene.other, scene.prod
        await wait_ready(env, prod, watch, [coord, worker])
        base = scrape(port)
        expected = {f"fz-{i}": mix_expected(i) for i in range(valid)}
        ids = list(expected)
        t_gen = time.monotonic()
        msgs = await asyncio.to_thread(generate_bad, bad, ids, seed)
        say(f"  generated {len(msgs)} bad messages in {time.monotonic() - t_gen:.1f}s")
        msgs += [oversize("triggers"), oversize("completions")] + (blowups() if with_blowups else [])
        rnd = random.Random(seed)
        plan: list[tuple[str, Any]] = [("bad", m) for m in msgs] + [("valid", i) for i in range(valid)]
        rnd.shuffle(plan)
        # valid runs first in their own order so their run_ids exist when bad completions name them
        refused: Counter = Counter()
        sent_bad: list[Bad] = []
        futures = []
        for n, (kind, item) in enumerate(plan):
            if kind == "valid":
                await trigger(prod, env, "chaos_mix", {"n": item}, ids[item])
            else:
                topic = env.topics.triggers if item.topic == "triggers" else env.topics.completions
                try:
                    futures.append(await prod.send(topic, item.value, key=item.key))
                    sent_bad.append(item)
                except Exception as exc:  # refused by the client or broker (size)
                    refused[f"{item.category}: {type(exc).__name__}"] += 1
            if n % 500 == 499:
                await prod.flush()
                await asyncio.sleep(0.2)  # bounded rate
        for f in futures:
            try:
                await f
            except Exception as exc:
                refused[type(exc).__name__] += 1
        finished = await watch.wait(set(ids), timeout, progress=say)
        # misbehaving handlers: each fails only its own run, with a clear error
        handler_runs = {}
        for wf in ("chaos_raise", "chaos_hang", "chaos_unserializable"):
            rid = f"{wf}-{uuid.uuid4().hex[:6]}"
            handler_runs[rid] = wf
            await trigger(prod, env, wf, {}, rid)
        await prod.flush()
        await watch.wait(set(handler_runs), 120)
        expected_dlq = sum(1 for m in sent_bad if m.expect == "dlq")
        expected_failed = sum(1 for m in sent_bad if m.expect == "failed_run")
        expected_ignored = sum(1 for m in sent_bad if m.expect == "ignored")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(dlq.records) < expected_dlq:
            await asyncio.sleep(0.5)
        await asyncio.sleep(3.0)
        after = scrape(port)
        ign = lambda s: metric_sum(s, "legato_events_ignored_total", lambda k: "rekeyed" not in k and "replayed" not in k)
        ignored_by_reason = {k.split('"')[1]: after[k] - base.get(k, 0) for k in after if k.startswith("legato_events_ignored_total{")}
        reasons: Counter = Counter()
        for r in dlq.records:
            v = r.json()
            reasons[(v.get("source_topic", "?").split(".")[-1], (v.get("reason") or "<none>").split(":")[0])] += 1
        no_reason = sum(1 for r in dlq.records if not (r.json() or {}).get("reason"))
        failed_unknown = sum(1 for rid, evs in watch.terminal.items()
                             if not rid.startswith(("fz-", "probe-", "chaos_")) and evs[0].get("error", {}).get("type") == "UnknownWorkflow")
        from legato.topics.codec import payload_text

        in_dlq = Counter((v.get("source_topic", "").rsplit(".", 1)[-1], v.get("payload")) for v in (r.json() or {} for r in dlq.records))
        missing: Counter = Counter()
        for m in sent_bad:
            if m.expect == "dlq":
                k = (m.topic, payload_text(m.value))
                if in_dlq[k] > 0:
                    in_dlq[k] -= 1
                else:
                    missing[f"{m.topic}/{m.category}"] += 1
        res = judge(expected, watch, [], [])
        res["dlq_missing_by_category"] = dict(missing)
        by_cat: Counter = Counter((m.topic, m.category, m.expect) for m in sent_bad)
        res.update({
            "scenario": "fuzz", "bad_generated": len(msgs), "bad_sent": len(sent_bad), "refused_at_produce": dict(refused),
            "expected_dlq": expected_dlq, "dlq_records": len(dlq.records), "dlq_without_reason": no_reason,
            "dlq_by_reason": {f"{t}/{r}": n for (t, r), n in sorted(reasons.items())},
            "expected_ignored": expected_ignored, "ignored_counted": ign(after) - ign(base), "ignored_by_reason": {k: v for k, v in ignored_by_reason.items() if v},
            "expected_unknown_workflow_runs": expected_failed, "unknown_workflow_runs_failed": failed_unknown,
            "by_category": {f"{t}/{c} -> {e}": n for (t, c, e), n in sorted(by_cat.items())},
            "handler_runs": {wf: (watch.terminal[rid][0]["status"], (watch.terminal[rid][0].get("error") or {}).get("type"),
                                  (watch.terminal[rid][0].get("error") or {}).get("message", "")[:120]) if rid in watch.terminal else None
                             for rid, wf in handler_runs.items()},
            "all_finished": finished, "processes_alive": coord.alive() and worker.alive(),
            "coordinator_restarts": coord.starts - 1, "prefix": env.prefix,
        })
        return res


# --------------------------------------------------------------------------- report


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, CPython {platform.python_version()}, {platform.system()} {platform.release()}"


KEYS = ["runs", "kills", "completed", "lost", "wrong_output", "failed_answered_in_time", "duplicate_terminal_events", "runs_with_duplicate_terminal",
        "distinct_requests", "reissued_requests", "executions", "duplicate_executions", "takeover_s", "recovery_s", "elapsed_s"]


def render(results: list[dict[str, Any]], command: str, mode: str) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"### `{command}` — {now}", "", f"Machine: {machine()}, broker on the same cores (shared with other test runs)  ",
             f"Mode: {mode}", "", "| scenario | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    for r in results:
        lines.append(f"| {r['scenario']} | " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in KEYS) + " |")
    lines.append("")
    for r in results:
        extra = {k: v for k, v in r.items() if k not in KEYS and k not in ("scenario", "lost_ids", "wrong_examples") and v not in (None, [], {})}
        if r.get("lost_ids"):
            extra["lost_ids"] = r["lost_ids"]
        if r.get("wrong_examples"):
            extra["wrong_examples"] = r["wrong_examples"]
        lines.append(f"- **{r['scenario']}**: " + "; ".join(f"{k}: {v}" for k, v in extra.items()))
    return "\n".join(lines) + "\n\n"


def verdict(r: dict[str, Any]) -> bool:
    ok = r.get("lost", 0) == 0 and r.get("all_finished", True) and r.get("wrong_output", 0) == 0 and r.get("conflicting_terminal", 0) == 0 \
        and r.get("duplicate_terminal_events", 0) == 0 and r.get("failed_answered_in_time", 0) == 0
    if r["scenario"] == "retries":
        ok = ok and r["failed"] == 0
    if r["scenario"] in ("coordinator", "takeover", "cluster"):
        ok = ok and r["duplicate_executions"] == 0
    if r["scenario"] == "fuzz":
        ok = ok and r["dlq_records"] >= r["expected_dlq"] and r["dlq_without_reason"] == 0 and r["processes_alive"] \
            and r["unknown_workflow_runs_failed"] >= r["expected_unknown_workflow_runs"] and r["coordinator_restarts"] == 0
    if r["scenario"] == "timers":
        ok = ok and r["right_output"] == r["runs"]
    if r["scenario"] == "waits":
        ok = ok and r["succeeded"] == r["runs"] and r["ended_early"] == 0 and r["waits_ended_before_their_signal"] == 0 \
            and r["ended_before_kill"] == 0 and r["processes_alive"]
    if r["scenario"] == "deploy":
        ok = ok and r["duplicate_executions"] == 0 and r["switched_version"] == 0 and r["new_not_v2"] == 0 \
            and r["kills"] >= 1 and all(k["v1_in_flight"] > 0 for k in r["kill_log"])
    if r["scenario"] == "broker":
        ok = ok and r["same_pids"] and r["processes_alive"]
    if r["scenario"] == "schedules":
        ok = ok and r["ticks_missed"] == 0 and r["ticks_duplicated"] == 0 and r["ticks_expected"] > 0 and r["processes_alive"] \
            and r["duplicate_executions"] == 0
    if r["scenario"] == "cluster":
        ok = ok and r["processes_alive"] and r["kills"] >= 1
    return ok


async def run_scenarios(settings: Settings, scenarios: list[str], runs: int, kills: int, bad: int, valid: int, rate: float,
                        session_timeout: float | None, timeout: float = 900.0, waits: int | None = None) -> list[dict[str, Any]]:
    extra: dict[str, str] = {}
    if session_timeout:
        extra["LEGATO_SESSION_TIMEOUT"] = str(session_timeout)
    results = []
    for name in scenarios:
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        if name == "coordinator":
            r = await scenario_coordinator(settings.bootstrap, runs, kills, rate, extra_env=extra, timeout=timeout)
        elif name == "worker":
            r = await scenario_worker(settings.bootstrap, extra_env=extra)
        elif name == "takeover":
            r = await scenario_takeover(settings.bootstrap, min(runs, 400), extra_env=extra)
        elif name == "broker":
            r = await scenario_broker(None, min(runs, 200), extra_env=extra)
        elif name == "timers":
            r = await scenario_timers(settings.bootstrap, extra_env=extra)
        elif name == "deploy":
            r = await scenario_deploy(settings.bootstrap, min(runs, 1000), kills, extra_env=extra, timeout=timeout)
        elif name == "waits":
            r = await scenario_waits(settings.bootstrap, waits if waits is not None else min(runs, 1000), extra_env=extra, timeout=timeout)
        elif name == "retries":
            from legato.tools.chaos_retries import scenario_retries

            r = await scenario_retries(settings.bootstrap, runs, kills, extra_env=extra, timeout=timeout)
        elif name == "schedules":
            from legato.tools.chaos_schedules import scenario_schedules

            r = await scenario_schedules(settings.bootstrap, kills, extra_env=extra, timeout=timeout)
        elif name == "cluster":
            from legato.tools.chaos_cluster import scenario_cluster

            r = await scenario_cluster(runs, min(rate, 15.0), extra_env=extra, timeout=timeout)
        else:
            r = await scenario_fuzz(settings.bootstrap, bad, valid, extra_env=extra, timeout=timeout)
        r.setdefault("elapsed_s", round(time.monotonic() - t0, 1))
        r["ok"] = verdict(r)
        print("  " + ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("kill_log", "by_category", "gap_by_partition_s")), flush=True)
        results.append(r)
    return results


def main(settings: Settings, scenario: str = "all", runs: int = 2000, kills: int = 5, bad: int = 10_000, valid: int = 500,
         rate: float = 40.0, session_timeout: float | None = None, output: Path | None = None,
         command: str | None = None, timeout: float = 900.0, waits: int | None = None) -> int:
    """Run one scenario or all of them, print the figures, append them to ``output``; exit 1 when a goal is missed."""
    import logging

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM still stops every process we started
    scenarios = list(SCENARIOS) if scenario == "all" else [scenario]
    results = asyncio.run(run_scenarios(settings, scenarios, runs, kills, bad, valid, rate, session_timeout, timeout, waits))
    mode = f"transactional coordinator, consumers read_committed, session timeout {session_timeout or Settings().session_timeout:g} s"
    text = render(results, command or "legato chaos " + " ".join(sys.argv[2:]), mode)
    print(text)
    if output is not None:
        with open(output, "a", encoding="utf-8") as f:
            f.write(text)
    return 0 if all(r["ok"] for r in results) else 1

