"""The harness of ``legato chaos`` and of the integration tests that drive real processes on a real broker.

- ``Env``/``Proc``: a fresh topic prefix and data dirs, ``legato coordinator`` / ``legato worker`` OS processes started
  there (workflows and handlers from ``chaos_data/``), killed with SIGKILL and restarted (``kill_and_restart``)
- ``Tail``/``RunWatch``/``Scene``: every committed record of some topics, the runs' terminal events, a producer
- ``judge``/``answered_in_time``: what happened to the runs, judged only from the topics
- ``PrivateBroker``: a single-node broker with its own port and data dir (outages, TLS, SASL, ACL tests)
- ``scrape``/``metric_sum``: a process's /metrics
- ``Options``: what every scenario of ``legato chaos`` is given (``tools/chaos.py``'s ``SCENARIOS``)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson

from legato.streams import kafka_io
from legato.streams.config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("run.completed", "run.failed", "run.cancelled")

HANDLERS_MODULE = "chaos_handlers"
DATA = Path(__file__).resolve().parent / "chaos_data"
"""The scenarios' workflows (``*.yaml``) and their activities (``chaos_handlers.py``)."""
ANSWERED_ELSEWHERE = ["retry_intake", "retry_kyc", "retry_score", "retry_limit", "deadline_answer"]
"""Activities no Legato handler serves: ``chaos_data/independent_worker.py`` (``retries``) or a test answers them."""
ACTIVITIES = ["chaos_echo", "chaos_slow", "chaos_limited", "chaos_nobody", "chaos_raise", "chaos_hang", "chaos_unserializable", "chaos_blob", "chaos_digest",
              *ANSWERED_ELSEWHERE]


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
        """The topics, replicated as the processes' own settings say: the default factor follows the brokers that the
        answering broker knows of, and one that has not heard of the last broker yet would create them with fewer
        replicas than the processes then require (``chaos cluster`` stopped at start-up that way)."""
        from legato.streams.admin import Replication, ensure_topics

        def setting(name: str) -> int | None:
            value = self.env.get(name)
            return int(value) if value else None

        replication = Replication(setting("LEGATO_REPLICATION_FACTOR"), setting("LEGATO_MIN_INSYNC_REPLICAS"))
        await ensure_topics(self.bootstrap, self.topics, ACTIVITIES, self.partitions, compacted=[self.topics.changelog], replication=replication)

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


@dataclass
class Kill:
    """One SIGKILL and restart by :func:`kill_and_restart`."""

    at: float  # wall-clock time of the kill
    done_before: int  # runs of the watched ids finished at the kill
    down_s: float  # how long the process stayed down
    resumed_at: int  # runs of the watched ids finished at the restart


async def kill_and_restart(proc: Proc, watch: RunWatch, run_ids: list[str], rnd: random.Random, previous: Kill | None,
                           settle: tuple[float, float] = (0.0, 3.0), recovered: int = 20, patience_s: float = 300.0) -> Kill:
    """SIGKILL ``proc`` while it serves, keep it down a random 0-2 s, and start it again.

    After an earlier kill (``previous``), it first waits until the restarted process has finished ``recovered`` more of
    ``run_ids`` (or all of them, or ``patience_s`` passed), so that a kill never lands on a process still recovering
    from the last; then a random ``settle`` (s) more. ``rnd`` draws the settle, then the down time."""
    if previous is not None:
        waited = time.monotonic()
        while watch.done(run_ids) < min(len(run_ids), previous.resumed_at + recovered) and time.monotonic() - waited < patience_s:
            await asyncio.sleep(0.1)
    await asyncio.sleep(rnd.uniform(*settle))
    done_before = watch.done(run_ids)
    at = proc.kill()
    down = rnd.uniform(0.0, 2.0)
    await asyncio.sleep(down)
    proc.start()
    return Kill(at, done_before, down, watch.done(run_ids))


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


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, CPython {platform.python_version()}, {platform.system()} {platform.release()}"


@dataclass(frozen=True)
class Options:
    """What ``legato chaos`` gives every scenario of its registry (``SCENARIOS`` in tools/chaos.py)."""

    bootstrap: str
    runs: int = 2000
    kills: int = 5
    bad: int = 10_000
    valid: int = 500
    rate: float = 40.0
    timeout: float = 900.0
    waits: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
