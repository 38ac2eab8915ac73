"""``legato chaos cluster``: broker failures on a local 3-broker cluster with runs in flight.

A private :class:`~legato.tools.kafka_cluster.LocalCluster` (free ports, a temporary directory) runs Legato's topics
with replication factor 3 and ``min.insync.replicas`` 2; one ``legato coordinator`` and one ``legato worker`` drive
``chaos_mix`` runs triggered at a steady rate while these happen, one after the other (``phases``):

- ``leader``: SIGKILL the broker leading the most partitions of the run changelog and ``<prefix>.completions``;
  it comes back once runs finish again without it;
- ``rolling``: a rolling restart, each broker stopped (SIGTERM) and started again once the previous one's partitions
  are back in sync;
- ``coordinator``: SIGKILL a broker, then SIGKILL the coordinator while that broker is down; the coordinator is
  restarted at once, the broker after runs finish again.

Judged like every scenario (``chaos.judge``: lost, duplicate terminal events, duplicate executions, answered in
time); ``stall_s`` per disruption is the longest time any partition of ``<prefix>.runs`` went without a record after
it (the partitions the disruption did not touch answer at once).
"""
from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from legato.tools.harness import Env, RunWatch, Scene, mix_expected, trigger, wait_ready
from legato.tools.kafka_cluster import LocalCluster, free_base_port

PHASES = ("leader", "rolling", "coordinator")
REPLICATION = {"LEGATO_REPLICATION_FACTOR": "3", "LEGATO_MIN_INSYNC_REPLICAS": "2"}


def stall_after(watch: RunWatch, t: float) -> float | None:
    """The longest time a partition of the runs topic went without a record after ``t`` (wall clock, seconds)."""
    gaps = []
    for recs in watch.by_partition.values():
        after = [r.timestamp / 1000 for r in recs if r.timestamp / 1000 > t]
        if after:
            gaps.append(min(after) - t)
    return round(max(gaps), 2) if gaps else None


async def _most_leading(cluster: LocalCluster, topics: list[str]) -> int:
    """The broker that leads the most partitions of ``topics``."""
    counts: dict[int, int] = {}
    for (_topic, _p), node in (await cluster.leaders(topics)).items():
        if node >= 0:
            counts[node] = counts.get(node, 0) + 1
    return max(sorted(counts), key=lambda n: counts[n])


async def _progress(watch: RunWatch, ids: list[str], more: int, timeout: float) -> bool:
    """Wait until ``more`` further runs of ``ids`` have finished (or all of them): runs move again."""
    target = min(len(ids), watch.done(ids) + more)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if watch.done(ids) >= target:
            return True
        await asyncio.sleep(0.1)
    return False


async def scenario_cluster(runs: int = 2000, rate: float = 15.0, phases: tuple[str, ...] = PHASES, extra_env: dict[str, str] | None = None,
                           timeout: float = 900.0, say: Callable[[str], None] = print, workdir: Path | None = None,
                           partitions: int = 8, heal: bool = True, cluster: LocalCluster | None = None) -> dict[str, Any]:
    """``runs`` chaos_mix runs triggered at ``rate``/s through ``phases``; ``heal=False`` leaves the broker killed in
    the ``leader`` phase down until the end (the runs then finish on two brokers). On ``cluster`` when given (started
    if needed, left to the caller), else on a private one."""
    own = cluster is None
    cluster = cluster or LocalCluster(free_base_port(3), Path(tempfile.mkdtemp(prefix="legato-cluster-")), 3, heap="-Xmx384m")
    try:
        await asyncio.to_thread(cluster.start)
        say(f"  3-broker cluster at {cluster.bootstrap} (under {cluster.root})")
        env = Env(cluster.bootstrap, workdir, partitions=partitions, extra_env={"CHAOS_DELAY": "0.02", **REPLICATION, **(extra_env or {})})
        async with Scene(env, [env.topics.completions, env.topics.requests("chaos_echo")]) as scene:
            return await _disruptions(cluster, env, scene, runs, rate, phases, timeout, say, heal)
    finally:
        if own:
            await asyncio.to_thread(cluster.cleanup)


async def _disruptions(cluster: LocalCluster, env: Env, scene: Scene, runs: int, rate: float, phases: tuple[str, ...], timeout: float,
                       say: Callable[[str], None], heal: bool) -> dict[str, Any]:
    coord, worker = env.process("coordinator"), env.process("worker")
    watch, prod = scene.watch, scene.prod
    ready = await wait_ready(env, prod, watch, [coord, worker], timeout=180.0)
    say(f"  processes ready after {ready:.1f}s (prefix {env.prefix}, logs {env.workdir})")
    ours = [env.topics.changelog, env.topics.completions]
    expected = {f"cl-{i}": mix_expected(i) for i in range(runs)}
    ids = list(expected)
    t0 = time.time()
    events: list[dict[str, Any]] = []
    # Each disruption waits for the triggers to reach its gate, and the triggers wait at the gate for the
    # disruption: runs are in flight at every disruption, and triggers go on during each outage.
    count = sum({"leader": 1, "rolling": cluster.size, "coordinator": 1}.get(p, 0) for p in phases)
    gates = [runs * (k + 1) // (count + 1) for k in range(count)]
    reached = [asyncio.Event() for _ in gates]
    done = [asyncio.Event() for _ in gates]
    triggered = 0

    async def produce_all() -> None:
        nonlocal triggered
        base, since = time.monotonic(), 0
        for i, rid in enumerate(ids):
            if i in gates:
                k = gates.index(i)
                reached[k].set()
                await done[k].wait()
                base, since = time.monotonic(), i
            delay = base + (i - since) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await trigger(prod, env, "chaos_mix", {"n": i}, rid)
            triggered = i + 1
        await prod.flush()

    def note(what: str, t: float) -> dict[str, Any]:
        finished = watch.done(ids)
        event = {"event": what, "at_s": round(t - t0, 1), "finished_before": finished, "in_flight": triggered - finished}
        events.append(event)
        say(f"  {what} at +{t - t0:.1f}s ({finished}/{runs} finished, {triggered - finished} in flight)")
        return event

    gate = iter(range(count))

    async def at_gate() -> int:
        k = next(gate)
        await reached[k].wait()
        return k

    async def back(node: int) -> None:
        await asyncio.to_thread(cluster.restart, node)
        await cluster.wait_in_sync([*ours, "__consumer_offsets", "__transaction_state"], 3)
        note(f"broker {node} back, partitions in sync", time.time())

    async def chaos() -> None:
        for phase in phases:
            if phase == "leader":
                k = await at_gate()
                node = await _most_leading(cluster, ours)
                note(f"SIGKILL broker {node} (leads the most changelog + completions partitions)", cluster.kill(node))
                done[k].set()
                if heal:
                    await _progress(watch, ids, 50, 180)
                    await back(node)
            elif phase == "rolling":
                for node in cluster.nodes:
                    k = await at_gate()
                    t = time.time()
                    stopping = asyncio.create_task(asyncio.to_thread(cluster.stop_node, node))
                    done[k].set()
                    await stopping
                    note(f"rolling restart: broker {node} stopped", t)
                    await back(node)
            elif phase == "coordinator":
                k = await at_gate()
                node = await _most_leading(cluster, ours)
                note(f"SIGKILL broker {node}", cluster.kill(node))
                done[k].set()
                await asyncio.sleep(1.0)
                note("SIGKILL coordinator (broker down)", coord.kill())
                coord.start()
                await _progress(watch, ids, 50, 180)
                await back(node)
            else:
                raise ValueError(f"unknown cluster phase {phase!r} (known: {', '.join(PHASES)})")

    await asyncio.gather(produce_all(), chaos())
    finished = await watch.wait(set(ids), timeout, progress=say)
    await asyncio.sleep(5.0)  # late duplicates
    for event in events:
        if event["event"].startswith(("SIGKILL", "rolling")):
            event["stall_s"] = stall_after(watch, t0 + event["at_s"])
    res = scene.judge(expected)
    stalls = [e["stall_s"] for e in events if e.get("stall_s") is not None]
    res.update({"scenario": "cluster", "kills": sum(1 for e in events if e["event"].startswith("SIGKILL")),
                "max_stall_s": max(stalls) if stalls else None, "events": events, "all_finished": finished,
                "processes_alive": coord.alive() and worker.alive(), "rate": rate, "prefix": env.prefix,
                "replication": "factor 3, min.insync.replicas 2"})
    return res
