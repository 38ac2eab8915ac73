"""Chaos scenarios that SIGKILL Legato's processes: ``coordinator`` (restarted K times), ``worker`` (while every run
has an activity in its handler), ``takeover`` (one of two coordinators killed for good)."""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from legato.tools.harness import Env, Kill, Scene, group_members, kill_and_restart, mix_expected, trigger, wait_ready


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
            last: Kill | None = None
            for m in moments:
                delay = start + m - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                last = await kill_and_restart(coord, watch, ids, rnd, last)
                kill_log.append({"at_s": round(last.at - t0, 1), "finished_before": last.done_before, "down_s": round(last.down_s, 2)})
                say(f"  SIGKILL coordinator at +{last.at - t0:.1f}s ({last.done_before}/{runs} finished), restarted after {last.down_s:.1f}s")

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
