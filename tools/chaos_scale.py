"""``legato chaos scale``: coordinators and workers scaled out and back in while runs are in flight.

One ``legato coordinator`` and one ``legato worker`` serve ``chaos_mix`` runs triggered at a steady rate; after a
steady stretch (``WARMUP_S``) each role is scaled 1 -> 3 -> 1, one process at a time (``STEPS``): a new process is
started, or the newest one is stopped with SIGTERM as a deployment stops it. Each step waits until the role's
consumer group is stable with the new member count, and 2 s more, before the next one. The triggers go on at the same
rate until the last step is over (at least ``runs`` of them), so runs are in flight at every step.

Judged like every scenario (``harness.judge``: lost, duplicate terminal events, duplicate executions). Per step:

- ``settled_s``: from the step to the group being stable with its new member count;
- ``stall_s``: the longest gap between two records of one partition while the step settles (and 2 s after), on
  ``<prefix>.runs`` for a coordinator step and on ``<prefix>.completions`` for a worker step; ``baseline_gap_s`` is
  the same measure over the steady stretch before the first step.

A duplicate execution is only acceptable as the at-least-once bound on requests in flight at a rebalance: a request
a worker received but had not answered when its partition moved runs again on the next owner; a coordinator that
takes a partition over re-issues the requests whose completions it has not read yet, and a worker that did not see
the first copy (the worker group moved too, or another worker answered it) runs the copy. ``duplicates_in_flight``
counts the duplicated requests first sent before a step's window (start to settled + 2 s) ended and first answered
after it began;
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
WARMUP_S = 5.0


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
    """Each request executed more than once, checked against the steps' rebalance ``windows`` ({step: (start,
    end)}): in flight at a step if its first copy was sent before the window ended and first answered after the step
    began. ``duplicates_after_reissue``: those whose request a coordinator sent again (a new partition owner re-issues
    the requests whose completions it has not read yet; a worker that never saw the first copy runs it)."""
    sent: dict[str, list[float]] = {}
    for r in requests:
        v = r.json()
        if isinstance(v, dict) and isinstance(v.get("request_id"), str):
            sent.setdefault(v["request_id"], []).append(r.timestamp / 1000)
    answers: dict[str, list[float]] = {}
    for c in completions:
        v = c.json()
        if isinstance(v, dict) and isinstance(v.get("request_id"), str):
            answers.setdefault(v["request_id"], []).append(c.timestamp / 1000)
    in_flight, reissued, unexplained, by_step = 0, 0, [], {step: 0 for step in windows}
    for rid, times in answers.items():
        if len(times) < 2:
            continue
        first, copies = min(times), sorted(sent.get(rid, []))
        steps = [step for step, (start, end) in windows.items() if copies and copies[0] <= end and first >= start]
        if steps:
            in_flight += len(times) - 1
            by_step[steps[0]] += len(times) - 1
            reissued += (len(times) - 1) if len(copies) > 1 else 0
        else:
            unexplained.append({"request_id": rid, "sent": copies, "answers": sorted(times)})
    return {"duplicates_in_flight": in_flight, "duplicates_after_reissue": reissued, "duplicates_by_step": {k: v for k, v in by_step.items() if v},
            "duplicates_unexplained": sum(len(u["answers"]) - 1 for u in unexplained), "unexplained_examples": unexplained[:5]}


async def scenario_scale(bootstrap: str, runs: int = 2000, rate: float = 40.0, steps: tuple[tuple[str, int], ...] = STEPS,
                         extra_env: dict[str, str] | None = None, timeout: float = 900.0, say: Callable[[str], None] = print,
                         workdir: Path | None = None, partitions: int = 8) -> dict[str, Any]:
    """chaos_mix runs triggered at ``rate``/s (at least ``runs``) while coordinators and workers are scaled through ``steps``."""
    env = Env(bootstrap, workdir, partitions=partitions, extra_env={"CHAOS_DELAY": "0.02", **(extra_env or {})})
    async with Scene(env, [env.topics.completions, env.topics.requests("chaos_echo")]) as scene:
        procs: dict[str, list[Proc]] = {"coordinator": [env.process("coordinator", "coordinator-1")], "worker": [env.process("worker", "worker-1")]}
        watch, prod = scene.watch, scene.prod
        ready = await wait_ready(env, prod, watch, [p for ps in procs.values() for p in ps], timeout=180.0)
        say(f"  processes ready after {ready:.1f}s (prefix {env.prefix}, logs {env.workdir})")
        groups = {"coordinator": env.topics.coordinator_group, "worker": f"{env.prefix}-worker"}
        ids: list[str] = []
        log: list[dict[str, Any]] = []
        scaled = asyncio.Event()
        t_first_trigger = time.time()

        async def produce_all() -> None:
            # at least ``runs``, and on until the last step has settled (and its stall window passed): runs are in
            # flight at every step however long the groups take to settle
            start, i = time.monotonic(), 0
            while i < runs or not scaled.is_set():
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                rid = f"sc-{i}"
                await trigger(prod, env, "chaos_mix", {"n": i}, rid)
                ids.append(rid)
                i += 1
            await prod.flush()

        async def scale() -> None:
            await asyncio.sleep(WARMUP_S)  # the steady stretch ``baseline_gap_s`` is measured on
            for role, delta in steps:
                finished, t = watch.done(ids), time.time()
                in_flight = len(ids) - finished
                if delta > 0:
                    procs[role].append(env.process(role, f"{role}-{len(procs[role]) + 1}"))
                else:
                    await asyncio.to_thread(procs[role].pop().stop)
                want = len(procs[role])
                # a stopped member leaves at once: wait for the group to be stable with exactly ``want`` members
                deadline = time.monotonic() + 180.0
                while await group_members(bootstrap, groups[role], want, timeout=60.0) != want and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                settled = time.time()
                step = {"step": f"{role} {want - delta} -> {want}", "role": role, "at": t, "at_s": round(t - t_first_trigger, 1),
                        "settled_s": round(settled - t, 1), "settled": settled, "finished_before": finished, "in_flight": in_flight}
                log.append(step)
                say(f"  {step['step']} at +{step['at_s']}s ({in_flight} runs in flight), group stable after {step['settled_s']}s")
                await asyncio.sleep(SETTLE_EXTRA_S)  # the step's stall window, before the next step disturbs it
            scaled.set()

        await asyncio.gather(produce_all(), scale())
        expected = {rid: mix_expected(int(rid[3:])) for rid in ids}
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
        windows = {s["step"]: (s["at"], s["settled"] + SETTLE_EXTRA_S) for s in log}
        res.update(duplicates_by_step(mine(requests), mine(completions), windows))
        alive = all(p.alive() for ps in procs.values() for p in ps)
        res.update({
            "scenario": "scale", "kills": 0, "steps": [{k: v for k, v in s.items() if k not in ("at", "settled", "role")} for s in log],
            "max_stall_s": max((s["stall_s"] for s in log if s["stall_s"] is not None), default=None), "baseline_gap_s": baseline,
            "all_finished": finished, "processes_alive": alive, "rate": rate, "prefix": env.prefix,
            "checks": {"every step had runs in flight": all(s["in_flight"] > 0 for s in log) and len(log) == len(steps),
                       "duplicate executions only of requests in flight at a step": res["duplicate_executions"] == 0
                       or res.get("duplicates_unexplained", 1) == 0},
        })
        return res
