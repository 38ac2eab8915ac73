"""A local Apache Kafka cluster of several KRaft nodes from the same jars as the single local broker.

Every node is broker and controller at once, and the nodes form one controller quorum: ``legato kafka start
--brokers 3`` runs three of them on ports 9092, 9094 and 9096 (controllers on 9093, 9095, 9097). Tests and ``legato
chaos cluster`` use :class:`LocalCluster` on free ports and temporary directories, to SIGKILL and restart a given
broker and to find which broker leads a topic partition.

Layout of one cluster (``root``)::

    cluster.id              the id every node's storage is formatted with
    node-<id>/server.properties, log4j.properties, broker.log, broker.out, broker.pid
    node-<id>/data/         log.dirs
"""
from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from pathlib import Path

from legato.tools import kafka_local

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
HEAP = "-Xmx512m"

BROKER_SESSION_TIMEOUT_MS = 4000
"""How long the controller waits for a broker's heartbeat before it fences the broker and moves its partitions'
leadership (Kafka's default is 9 s); a local cluster exists to show failures, so it notices them sooner."""


def free_base_port(brokers: int = 3) -> int:
    """A port P such that P .. P + 2·brokers − 1 can all be bound now, below Linux's ephemeral range (as
    ``chaos.free_port_pair``): the ports of a cluster of ``brokers`` nodes and their controllers."""
    import random
    import socket

    rng = random.Random()
    for _ in range(300):
        base = rng.randrange(20_000, 32_000 - 2 * brokers, 2)
        sockets = []
        try:
            for port in range(base, base + 2 * brokers):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {2 * brokers} adjacent free ports between 20000 and 32000 on 127.0.0.1")


def cluster_root(base_port: int) -> Path:
    """Where ``legato kafka start --brokers N`` keeps the cluster whose first broker listens on ``base_port``."""
    return kafka_local.cache_root() / f"cluster-{base_port}"


def local_cluster(bootstrap: str, brokers: int | None = None) -> "LocalCluster | None":
    """The ``legato kafka`` cluster whose first broker serves ``bootstrap``: of ``brokers`` nodes, or (None) of as
    many nodes as its directory holds; None when there is no such directory and ``brokers`` is not given."""
    _, base = kafka_local.parse_bootstrap(bootstrap)
    root = cluster_root(base)
    if brokers is None:
        brokers = len(list(root.glob("node-*"))) if root.is_dir() else 0
        if brokers == 0:
            return None
    return LocalCluster(base, root, brokers)


class LocalCluster:
    """``brokers`` combined broker+controller nodes on ``127.0.0.1``: node ``i`` (from 1) listens on
    ``base_port + 2(i − 1)`` and its controller on the next port. Processes are detached and recorded in pid files,
    so a cluster started by one process can be stopped or inspected by another."""

    def __init__(self, base_port: int, root: Path, brokers: int = 3, heap: str = HEAP):
        if brokers < 1:
            raise ValueError(f"a cluster needs at least 1 broker, not {brokers}")
        self.base_port = base_port
        self.root = Path(root)
        self.size = brokers
        self.heap = heap
        self._procs: dict[int, subprocess.Popen] = {}

    # ------------------------------------------------------------------ layout

    @property
    def nodes(self) -> list[int]:
        return list(range(1, self.size + 1))

    def port(self, node: int) -> int:
        return self.base_port + 2 * (node - 1)

    def address(self, node: int) -> str:
        return f"127.0.0.1:{self.port(node)}"

    @property
    def bootstrap(self) -> str:
        return ",".join(self.address(n) for n in self.nodes)

    def node_dir(self, node: int) -> Path:
        return self.root / f"node-{node}"

    def properties(self, node: int) -> str:
        """server.properties of ``node``: the single broker's settings with this node's id, listeners and data, the
        whole quorum as voters, and internal topics replicated on up to 3 nodes."""
        port = self.port(node)
        internal = str(min(3, self.size))
        replace = {
            "node.id": str(node),
            "controller.quorum.voters": ",".join(f"{n}@127.0.0.1:{self.port(n) + 1}" for n in self.nodes),
            "offsets.topic.replication.factor": internal,
            "transaction.state.log.replication.factor": internal,
            "transaction.state.log.min.isr": str(max(1, int(internal) - 1)),
        }
        extra = [
            f"default.replication.factor={internal}",
            f"min.insync.replicas={max(1, int(internal) - 1)}",
            f"broker.session.timeout.ms={BROKER_SESSION_TIMEOUT_MS}",
            f"broker.heartbeat.interval.ms={BROKER_SESSION_TIMEOUT_MS // 4}",
        ]
        text = kafka_local.server_properties(f"127.0.0.1:{port}", self.node_dir(node) / "data")
        return kafka_local._override(text, replace, extra)

    def _cluster_id(self) -> str:
        path = self.root / "cluster.id"
        if path.is_file() and len(path.read_text().strip()) == 22:
            return path.read_text().strip()
        cid = "-"
        while cid.startswith("-"):  # `kafka-storage format -t -abc` would read the id as an option
            cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        path.write_text(cid + "\n")
        return cid

    def _jvm(self, node: int) -> list[str]:
        d = self.node_dir(node)
        return [kafka_local._java(), "-Xms128m", self.heap, "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
                f"-Dlog4j.configuration=file:{d / 'log4j.properties'}", f"-Dkafka.logs.dir={d}", "-cp", str(kafka_local.libs_dir() / "*")]

    # ------------------------------------------------------------------ processes

    def pid(self, node: int) -> int | None:
        """The pid of ``node`` while it runs, else None."""
        try:
            pid = int((self.node_dir(node) / "broker.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        proc = self._procs.get(node)
        if proc is not None and proc.pid == pid:
            return pid if proc.poll() is None else None
        return pid if kafka_local._pid_running(pid) else None

    def running(self) -> list[int]:
        return [n for n in self.nodes if self.pid(n) is not None]

    def start(self, fresh: bool = False, timeout: float = START_TIMEOUT_S) -> str:
        """Start every node that is not running and wait until all of them are registered brokers."""
        t0 = time.monotonic()
        kafka_local.fetch_jars()
        self.root.mkdir(parents=True, exist_ok=True)
        if fresh:
            for n in self.nodes:
                if self.pid(n) is None:
                    shutil.rmtree(self.node_dir(n) / "data", ignore_errors=True)
        for n in self.nodes:
            if self.pid(n) is None:
                for p in (self.port(n), self.port(n) + 1):
                    if kafka_local._port_open("127.0.0.1", p):
                        raise RuntimeError(f"port {p} (node {n}) is in use by another process; stop it or pick other ports")
        for n in self.nodes:
            if self.pid(n) is None:
                self._format(n)
        for n in self.nodes:
            if self.pid(n) is None:
                self._spawn(n)
        self.wait_brokers(len(self.nodes), timeout)
        return f"Kafka cluster of {self.size} brokers at {self.bootstrap} ready in {time.monotonic() - t0:.1f}s; logs under {self.root}"

    def _format(self, node: int) -> None:
        d = self.node_dir(node)
        (d / "data").mkdir(parents=True, exist_ok=True)
        props = d / "server.properties"
        props.write_text(self.properties(node))
        (d / "log4j.properties").write_text(kafka_local._log4j_properties(d / "broker.log"))
        cmd = [*self._jvm(node), "kafka.tools.StorageTool", "format", "-t", self._cluster_id(), "-c", str(props), "--ignore-formatted"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"formatting node {node}'s storage failed:\n{(proc.stdout + proc.stderr)[-3000:]}"
                               f"\n(if it belongs to another cluster, delete {d / 'data'})")

    def _spawn(self, node: int) -> None:
        d = self.node_dir(node)
        with open(d / "broker.out", "ab") as out:
            proc = subprocess.Popen([*self._jvm(node), "kafka.Kafka", str(d / "server.properties")], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, cwd=d, start_new_session=True,
                                    preexec_fn=kafka_local._raise_open_files_limit)
        self._procs[node] = proc
        (d / "broker.pid").write_text(f"{proc.pid}\n")

    def restart(self, node: int, timeout: float = START_TIMEOUT_S) -> None:
        """Start ``node`` again (after :meth:`kill` or :meth:`stop_node`) and wait until it is registered again."""
        if self.pid(node) is not None:
            raise RuntimeError(f"node {node} is running")
        self._format(node)  # rewrites its config; the storage is kept (--ignore-formatted)
        self._spawn(node)
        self.wait_brokers(len(self.running()), timeout, must=[node])

    def kill(self, node: int) -> float:
        """SIGKILL ``node`` (no controlled shutdown, no leadership handed over); the wall-clock time of the kill."""
        pid = self.pid(node)
        if pid is None:
            raise RuntimeError(f"node {node} is not running")
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        self._reap(node, pid, 30.0)
        return t

    def stop_node(self, node: int) -> None:
        """SIGTERM ``node`` (a controlled shutdown: its leadership moves first), SIGKILL after 30 s."""
        pid = self.pid(node)
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        if not self._reap(node, pid, STOP_TIMEOUT_S):
            os.kill(pid, signal.SIGKILL)
            self._reap(node, pid, 30.0)

    def _reap(self, node: int, pid: int, timeout: float) -> bool:
        proc = self._procs.get(node)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.pid == pid:
                if proc.poll() is not None:
                    break
            elif not kafka_local._pid_running(pid):
                break
            time.sleep(0.1)
        else:
            return False
        (self.node_dir(node) / "broker.pid").unlink(missing_ok=True)
        return True

    def stop(self) -> str:
        """Stop every node; the nodes are stopped together so that the last ones still have a quorum to shut down with."""
        running = [(n, self.pid(n)) for n in self.nodes]
        running = [(n, p) for n, p in running if p is not None]
        for _, pid in running:
            os.kill(pid, signal.SIGTERM)
        killed = []
        for n, pid in running:
            if not self._reap(n, pid, STOP_TIMEOUT_S):
                os.kill(pid, signal.SIGKILL)
                self._reap(n, pid, 30.0)
                killed.append(n)
        if not running:
            return f"no local Kafka cluster running under {self.root}"
        return f"Kafka cluster stopped ({len(running)} brokers" + (f"; killed {killed} after {STOP_TIMEOUT_S:.0f}s)" if killed else ")")

    def cleanup(self) -> None:
        """SIGKILL every node (its data goes anyway) and delete the cluster's directory."""
        for n in self.nodes:
            if self.pid(n) is not None:
                self.kill(n)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, node: int, lines: int = 30) -> str:
        out = []
        for name in ("broker.out", "broker.log"):
            try:
                out += (self.node_dir(node) / name).read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                pass
        return "\n".join(out)

    # ------------------------------------------------------------------ metadata

    def wait_brokers(self, count: int, timeout: float = START_TIMEOUT_S, must: list[int] | None = None) -> None:
        """Wait until the cluster's metadata lists ``count`` brokers (and every node of ``must``)."""
        deadline = time.monotonic() + timeout
        seen: list[int] = []
        while time.monotonic() < deadline:
            for n in self.nodes:
                proc = self._procs.get(n)
                if proc is not None and proc.poll() is not None and (must is None or n in must or count == self.size):
                    raise RuntimeError(f"node {n} exited ({proc.returncode}):\n{self.log_tail(n)}")
            try:
                seen = asyncio.run(self._brokers())
            except Exception:
                seen = []
            if len(seen) >= count and all(n in seen and kafka_local.broker_alive(self.address(n), 2.0) for n in (must or [])):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the cluster at {self.bootstrap} lists brokers {seen} after {timeout:.0f}s, not {count}:\n"
                           + "\n".join(f"--- node {n}\n{self.log_tail(n, 10)}" for n in self.nodes))

    async def _brokers(self) -> list[int]:
        from aiokafka.admin import AIOKafkaAdminClient

        token = kafka_local._probing.set(True)  # refused connects to a starting node are expected, not errors
        admin = AIOKafkaAdminClient(bootstrap_servers=self._live_bootstrap(), request_timeout_ms=3000)
        try:
            await asyncio.wait_for(admin.start(), 5)
            return sorted(b["node_id"] for b in (await asyncio.wait_for(admin.describe_cluster(), 5))["brokers"])
        finally:
            await admin.close()
            kafka_local._probing.reset(token)

    def _live_bootstrap(self) -> str:
        live = self.running()
        return ",".join(self.address(n) for n in live) if live else self.bootstrap

    async def leaders(self, topics: list[str] | None = None) -> dict[tuple[str, int], int]:
        """The leader (node id, -1 when none) of every partition of ``topics`` (default: every topic)."""
        return {(t["topic"], p["partition"]): p["leader"] for t in await self._describe(topics) for p in t.get("partitions", [])}

    async def leader(self, topic: str, partition: int) -> int:
        """The node leading ``topic``'s ``partition`` (-1 while none does)."""
        return (await self.leaders([topic])).get((topic, partition), -1)

    async def in_sync(self, topics: list[str]) -> dict[tuple[str, int], list[int]]:
        """The in-sync replicas of every partition of ``topics``."""
        return {(t["topic"], p["partition"]): sorted(p["isr"]) for t in await self._describe(topics) for p in t.get("partitions", [])}

    async def _describe(self, topics: list[str] | None) -> list[dict]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self._live_bootstrap(), request_timeout_ms=5000)
        await admin.start()
        try:
            return await admin.describe_topics(topics)
        finally:
            await admin.close()

    async def wait_in_sync(self, topics: list[str], replicas: int, timeout: float = 120.0) -> None:
        """Wait until every partition of ``topics`` has ``replicas`` in-sync replicas (after a broker came back)."""
        deadline = time.monotonic() + timeout
        short: dict = {}
        while time.monotonic() < deadline:
            try:
                isr = await self.in_sync(topics)
            except Exception:
                isr = {}
            short = {tp: r for tp, r in isr.items() if len(r) < replicas}
            if isr and not short:
                return
            await asyncio.sleep(0.5)
        raise RuntimeError(f"partitions still short of {replicas} in-sync replicas after {timeout:.0f}s: {dict(list(short.items())[:5])}")

    def status(self) -> tuple[bool, str]:
        """``(all running, text)``: each broker, its pid and the partitions it leads."""
        running = self.running()
        lines = [f"Kafka cluster under {self.root}: {len(running)}/{self.size} brokers running"]
        led: dict[int, list[tuple[str, int]]] = defaultdict(list)
        if running:
            try:
                for tp, node in sorted(asyncio.run(self.leaders()).items()):
                    led[node].append(tp)
            except Exception as exc:
                lines.append(f"  (no metadata: {type(exc).__name__}: {exc})")
        for n in self.nodes:
            pid = self.pid(n)
            state = f"pid {pid}" if pid is not None else "stopped"
            parts = led.get(n, [])
            by_topic: dict[str, list[int]] = defaultdict(list)
            for topic, p in parts:
                by_topic[topic].append(p)
            lines.append(f"  broker {n} at {self.address(n)} (controller :{self.port(n) + 1}, {state}): leads {len(parts)} partitions")
            for topic, ps in sorted(by_topic.items()):
                if not topic.startswith("__"):
                    lines.append(f"    {topic} {ps}")
        if led.get(-1):
            lines.append(f"  without a leader: {sorted(led[-1])}")
        return len(running) == self.size, "\n".join(lines)
