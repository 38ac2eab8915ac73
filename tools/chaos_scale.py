"""``legato chaos scale``: coordinators and workers scaled out and back in while runs are in flight.

One ``legato coordinator`` and one ``legato worker`` serve ``chaos_mix`` runs triggered at a steady rate; each role
is then scaled 1 -> 3 -> 1, one process at a time (``STEPS``): a new process is started, or the newest one is stopped
with SIGTERM as a deployment stops it. Each step waits until the role's consumer group is stable with the new member
count before the next one; the triggers pause at each step until it has begun, so runs are in flight at every step.

Judged like every scenario (``harness.judge``: lost, duplicate terminal events, duplicate executions). Per step:

- ``settled_s``: from the step to the group being stable with its new member count;
- ``stall_s``: the longest gap between two records of one partition while the step settles (and 2 s after), on
  ``<prefix>.runs`` for a coordinator step and on ``<prefix>.completions`` for a worker step; ``baseline_gap_s`` is
  the same measure over the steady stretch before the first step.

A duplicate execution is only acceptable as the at-least-once bound of workers: a request in flight (sent, not yet
answered) while a worker group rebalanced may run again on the partition's next owner. ``duplicates_in_flight``
counts the duplicated requests that were sent before a worker step settled and first answered after it began;
``duplicates_unexplained`` the others (goal 0).
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

from legato.tools.harness import Env, Proc, Rec, Scene, group_members, mix_expected, trigger, wait_ready

STEPS: tuple[tuple[str, int], ...] = (
    ("coordinator", +1), ("coordinator", +1), ("worker", +1), ("worker", +1),
    ("coordinator", -1), ("coordinator", -1), ("worker", -1), ("worker", -1),
)
"""(role, +1 start one / -1 stop the newest): each role 1 -> 3 -> 1."""
SETTLE_EXTRA_S = 2.0


def max_gap(records: list[Rec], start: float, end: float) -> float | None:
    """The longest gap between consecutive records of one partition written in ``[start, end]`` (wall clock, s),
    counting from ``start`` to a partition's first record there."""
    by_partition: dict[int, list[float]] = {}
    for r in records:
        t = r.timestamp / 1000
        if start <= t <= end:
            by_partition.setdefault(r.partition, []).append(t)
    gaps = []
    for times in by_partition.values():
        times.sort()
        gaps.append(max(b - a for a, b in zip([start, *times], times)))
    return round(max(gaps), 2) if gaps else None


def duplicates_by_step(requests: list[Rec], completions: list[Rec], windows: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Each request executed more than once, checked against the worker steps' rebalance ``windows`` ({step:
    (start, settled)}): in flight at one if sent before it settled and first answered after it began."""
    sent: dict[str, float] = {}
    for r in requests:
        v = r.json()
        if isinstance(v, dict) and isinstance(v.get("request_id"), str):
            sent.setdefault(v["request_id"], r.timestamp / 1000)
    answers: dict[str, list[float]] = {}
    for c in completions:
        v = c.json()
        if isinstance(v, dict) and isinstance(v.get("request_id"), str):
            answers.setdefault(v["request_id"], []).append(c.timestamp / 1000)
    in_flight, unexplained, by_step = 0, [], {step: 0 for step in windows}
    for rid, times in answers.items():
        if len(times) < 2:
            continue
        first, at = min(times), sent.get(rid)
        steps = [step for step, (start, end) in windows.items() if at is not None and at <= end and first >= start]
        if steps:
            in_flight += len(times) - 1
            by_step[steps[0]] += len(times) - 1
        else:
            unexplained.append({"request_id": rid, "sent": at, "answers": sorted(times)})
    return {"duplicates_in_flight": in_flight, "duplicates_by_worker_step": by_step, "duplicates_unexplained": sum(len(u["answers"]) - 1 for u in unexplained),
            "unexplained_examples": unexplained[:5]}


async def scenario_scale(bootstrap: str, runs: int = 2000, rate: float = 40.0, steps: tuple[tuple[str, int], ...] = STEPS,
                         extra_env: dict[str, str] | None = None, timeout: float = 900.0, say: Callable[[str], None] = print,
                         workdir: Path | None = None, partitions: int = 8) -> dict[str, Any]:
    """``runs`` chaos_mix runs triggered at ``rate``/s while coordinators and workers are scaled through ``steps``."""
    env = Env(bootstrap, workdir, partitions=partitions, extra_env={"CHAOS_DELAY": "0.02", **(extra_env or {})})
    async with Scene(env, [env.topics.completions, env.topics.requests("chaos_echo")]) as scene:
        procs: dict[str, list[Proc]] = {"coordinator": [env.process("coordinator", "coordinator-1")], "worker": [env.process("worker", "worker-1")]}
        watch, prod = scene.watch, scene.prod
        ready = await wait_ready(env, prod, watch, [p for ps in procs.values() for p in ps], timeout=180.0)
        say(f"  processes ready after {ready:.1f}s (prefix {env.prefix}, logs {env.workdir})")
        groups = {"coordinator": env.topics.coordinator_group, "worker": f"{env.prefix}-worker"}
        expected = {f"sc-{i}": mix_expected(i) for i in range(runs)}
        ids = list(expected)
        gates = [runs * (k + 1) // (len(steps) + 1) for k in range(len(steps))]
        reached = [asyncio.Event() for _ in gates]
        begun = [asyncio.Event() for _ in gates]
        log: list[dict[str, Any]] = []
        triggered = 0
        t_first_trigger = time.time()

        async def produce_all() -> None:
            nonlocal triggered
            base, since = time.monotonic(), 0
            for i, rid in enumerate(ids):
                if i in gates:
                    k = gates.index(i)
                    reached[k].set()
                    await begun[k].wait()
                    base, since = time.monotonic(), i
                delay = base + (i - since) / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await trigger(prod, env, "chaos_mix", {"n": i}, rid)
                triggered = i + 1
            await prod.flush()

        async def scale() -> None:
            for k, (role, delta) in enumerate(steps):
                await reached[k].wait()
                finished = watch.done(ids)
                t = time.time()
                if delta > 0:
                    procs[role].append(env.process(role, f"{role}-{len(procs[role]) + 1}"))
                    begun[k].set()
                else:
                    begun[k].set()
                    await asyncio.to_thread(procs[role].pop().stop)
                want = len(procs[role])
                # a stopped member leaves at once: wait for the group to be stable with exactly ``want`` members
                deadline = time.monotonic() + 180.0
                while await group_members(bootstrap, groups[role], want, timeout=60.0) != want and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                settled = time.time()
                step = {"step": f"{role} {want - delta} -> {want}", "role": role, "at": t, "at_s": round(t - t_first_trigger, 1),
                        "settled_s": round(settled - t, 1), "settled": settled, "finished_before": finished, "in_flight": triggered - finished}
                log.append(step)
                say(f"  {step['step']} at +{step['at_s']}s ({triggered - finished} runs in flight), group stable after {step['settled_s']}s")

        await asyncio.gather(produce_all(), scale())
        finished = await watch.wait(set(ids), timeout, progress=say)
        await asyncio.sleep(5.0)  # late duplicates
        tails = scene.other.records if scene.other is not None else []
        completions = [r for r in tails if r.topic == env.topics.completions]
        requests = [r for r in tails if r.topic != env.topics.completions]
        runs_records = [r for recs in watch.by_partition.values() for r in recs]
        for step in log:
            records = runs_records if step["role"] == "coordinator" else completions
            step["stall_s"] = max_gap(records, step["at"], step["settled"] + SETTLE_EXTRA_S)
        baseline = max_gap(runs_records, t_first_trigger, log[0]["at"]) if log else None
        res = scene.judge(expected)
        ours = set(expected)
        mine = lambda rs: [r for r in rs if isinstance(r.json(), dict) and r.json().get("run_id") in ours]  # noqa: E731
        windows = {s["step"]: (s["at"], s["settled"] + SETTLE_EXTRA_S) for s in log if s["role"] == "worker"}
        res.update(duplicates_by_step(mine(requests), mine(completions), windows))
        alive = all(p.alive() for ps in procs.values() for p in ps)
        res.update({
            "scenario": "scale", "kills": 0, "steps": [{k: v for k, v in s.items() if k not in ("at", "settled", "role")} for s in log],
            "max_stall_s": max((s["stall_s"] for s in log if s["stall_s"] is not None), default=None), "baseline_gap_s": baseline,
            "all_finished": finished, "processes_alive": alive, "rate": rate, "prefix": env.prefix,
            "checks": {"every step had runs in flight": all(s["in_flight"] > 0 for s in log) and len(log) == len(steps),
                       "duplicate executions only of requests in flight at a worker rebalance": res["duplicate_executions"] == 0
                       or res.get("duplicates_unexplained", 1) == 0},
        })
        return res
