"""``legato chaos schedules``: a schedule ticking every second while the coordinator is SIGKILLed and restarted.

One ``legato coordinator`` and one ``legato worker``; ``legato schedule create tick --every 1s --catchup 10m`` starts
runs of ``chaos_tick``. The coordinator is SIGKILLed K times, each time restarted after a few seconds down; then
the schedule is paused. Judged from the topics alone: every tick from the schedule's creation until shortly before
the pause (``ticks_expected``) must have exactly one run (``run.started`` once per tick's run_id): ``ticks_missed`` and
``ticks_duplicated`` stay 0. ``triggers_refired`` counts the ticks whose trigger was produced more than once (a
coordinator killed between a tick's trigger and its record): the coordinator absorbs them as duplicate triggers.
``late_p50_s`` / ``late_max_s``: how long after its tick each tick's trigger was first produced (a restarted
coordinator fires once its group has given it the schedule's partition, after the killed member's session timeout).
"""
from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from legato.tools.harness import Env, Scene, legato_executable, wait_ready

SCHEDULE = "tick"
EVERY_S = 1
SETTLE_S = 3.0  # a tick this close to the pause may be decided after it: not expected


def _cli(env: Env, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([legato_executable(), "schedule", *args], env=env.env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"legato schedule {' '.join(args)}: {done.stderr}")
    return done


async def scenario_schedules(bootstrap: str, kills: int = 5, seed: int = 1, extra_env: dict[str, str] | None = None, timeout: float = 300.0,
                             say: Callable[[str], None] = print, workdir: Path | None = None) -> dict[str, Any]:
    from legato.streams.schedules import read_table
    from legato.workflows.schedule import run_id, ticks_between

    rng = random.Random(seed)
    env = Env(bootstrap, workdir, extra_env=extra_env)
    async with Scene(env, [env.topics.triggers, env.topics.completions, env.topics.requests("chaos_echo")]) as scene:
        coordinator, worker = env.process("coordinator"), env.process("worker")
        await wait_ready(env, scene.prod, scene.watch, [coordinator, worker])
        _cli(env, "create", SCHEDULE, "--workflow", "chaos_tick", "--every", f"{EVERY_S}s", "--catchup", "10m")
        spec = (await read_table(bootstrap, env.topics)).specs[SCHEDULE]
        kill_log = []
        for k in range(kills):
            await asyncio.sleep(rng.uniform(8.0, 16.0))  # a restarted coordinator gets its partitions before the next kill
            at = coordinator.kill()
            down = rng.uniform(1.0, 5.0)
            await asyncio.sleep(down)
            coordinator.start()
            kill_log.append({"kill": k + 1, "at_s": round(at - spec.created_ms / 1000, 1), "down_s": round(down, 1)})
            say(f"  SIGKILL coordinator #{k + 1} at +{at - spec.created_ms / 1000:.1f}s, restarted after {down:.1f}s")
        await asyncio.sleep(12.0)  # the last restart's catch-up, and some ticks after it
        paused_at = time.time()
        _cli(env, "pause", SCHEDULE)
        expected = [run_id(SCHEDULE, t) for t in ticks_between(spec, spec.created_ms - 1, int((paused_at - SETTLE_S) * 1000))]
        await asyncio.sleep(SETTLE_S)
        watch = scene.watch
        ours = lambda r: r.startswith(f"sched-{SCHEDULE}-")
        finished = await watch.wait({r for r in watch.started if ours(r)} | set(expected), timeout, progress=say)
        started = {r: n for r, n in watch.started.items() if ours(r)}
        first_sent: dict[str, int] = {}
        for rec in (scene.other.records if scene.other else []):
            if rec.topic == env.topics.triggers and rec.key and ours(rec.key.decode()):
                first_sent.setdefault(rec.key.decode(), rec.timestamp)
        tick_of = {run_id(SCHEDULE, t): t for t in ticks_between(spec, spec.created_ms - 1, int(time.time() * 1000))}
        late = sorted((first_sent[r] - tick_of[r]) / 1000 for r in first_sent if r in tick_of)
        triggers = Counter(rec.key.decode() for rec in (scene.other.records if scene.other else [])
                           if rec.topic == env.topics.triggers and rec.key and ours(rec.key.decode()))
        res = scene.judge({r: None for r in started})
        res.update({
            "scenario": "schedules", "kills": kills, "ticks_expected": len(expected), "ticks_fired": len(started),
            "ticks_duplicated": sum(n - 1 for n in started.values()), "ticks_missed": len([r for r in expected if r not in started]),
            "missed_examples": [r for r in expected if r not in started][:5], "triggers_refired": sum(n - 1 for n in triggers.values()),
            "late_p50_s": late[len(late) // 2] if late else None, "late_max_s": late[-1] if late else None,
            "all_finished": finished, "kill_log": kill_log, "processes_alive": coordinator.alive() and worker.alive(), "prefix": env.prefix,
        })
        return res
