"""Chaos scenarios that SIGKILL Legato's processes: ``coordinator`` (restarted K times), ``worker`` (while every run
has an activity in its handler; then stopped with SIGTERM, which it drains), ``takeover`` (one of two coordinators
killed for good)."""
from __future__ import annotations

import asyncio
import random
import signal
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
    """Runs whose activity takes ``seconds``; the worker is SIGKILLed while every one is in its handler, then restarted.
    Then as many runs again, and the worker is stopped with SIGTERM while every one is in its handler (a deploy, a
    scale-in) and a new one started: it drains, so none of those handlers starts again (``restarted_after_term``;
    every handler start is logged to a file, ``CHAOS_STARTS``)."""
    env = Env(bootstrap, workdir, extra_env=extra_env)
    starts_file = env.workdir / "chaos_slow_starts.txt"
    env.env["CHAOS_STARTS"] = str(starts_file)
    async with Scene(env, [env.topics.completions, env.topics.requests("chaos_slow")]) as scene:
        coord, worker = env.process("coordinator"), env.process("worker")
        watch, other, prod = scene.watch, scene.other, scene.prod
        await wait_ready(env, prod, watch, [coord, worker])

        def count(topic_is_completions: bool, prefix: bytes) -> int:
            return sum(1 for r in other.records if (r.topic == env.topics.completions) == topic_is_completions and (r.key or b"").startswith(prefix))

        async def in_handlers(names: dict[str, Any], prefix: bytes) -> int:
            """Trigger ``names``, wait until every request is out and the handlers are half-way; returns how many
            have not completed yet."""
            for rid, want in names.items():
                await trigger(prod, env, "chaos_slow", {"seconds": seconds, "tag": want["tag"]}, rid)
            await prod.flush()
            while count(False, prefix) < len(names):
                await asyncio.sleep(0.1)
            await asyncio.sleep(min(1.5, seconds / 2))
            return len(names) - count(True, prefix)

        killed = {f"slow-{i}": {"tag": f"t{i}"} for i in range(runs)}
        in_flight_at_kill = await in_handlers(killed, b"slow-")
        t_kill = worker.kill()
        worker.start()
        say(f"  SIGKILL worker with {in_flight_at_kill} activities in flight; restarted")
        finished = await watch.wait(set(killed), timeout, progress=say)

        termed = {f"term-{i}": {"tag": f"s{i}"} for i in range(runs)}
        in_flight_at_term = await in_handlers(termed, b"term-")
        t_term = time.time()
        old = worker.proc
        assert old is not None
        old.send_signal(signal.SIGTERM)
        worker.start()  # the new worker joins while the old one drains
        await asyncio.to_thread(old.wait, 120)
        drain_s = time.time() - t_term
        say(f"  SIGTERM worker with {in_flight_at_term} activities in flight; it stopped after {drain_s:.1f} s, a new one started")
        finished = await watch.wait(set(termed), timeout, progress=say) and finished
        await asyncio.sleep(2.0)

        expected = {**killed, **termed}
        res = scene.judge({k: None for k in expected})
        ends = [watch.terminal_recs[r][0].timestamp / 1000 for r in killed if r in watch.terminal_recs]
        term_ends = [watch.terminal_recs[r][0].timestamp / 1000 for r in termed if r in watch.terminal_recs]
        attempts = Counter(watch.terminal[r][0].get("output", {}).get("attempt") for r in expected if r in watch.terminal)
        wrong = [r for r in expected if r in watch.terminal and (watch.terminal[r][0]["status"] != "succeeded"
                                                                 or watch.terminal[r][0]["output"]["tag"] != expected[r]["tag"])]
        starts = Counter(starts_file.read_text().split()) if starts_file.exists() else Counter()
        res.update({"scenario": "worker", "kills": 1, "sigterms": 1, "in_flight_at_kill": in_flight_at_kill,
                    "in_flight_at_term": in_flight_at_term, "all_finished": finished, "wrong_output": len(wrong),
                    "recovery_s": round(max(ends) - t_kill, 1) if ends else None,
                    "drain_s": round(drain_s, 1), "term_runs_done_s": round(max(term_ends) - t_term, 1) if term_ends else None,
                    "restarted_after_kill": sum(1 for k in killed.values() if starts[k["tag"]] > 1),
                    "restarted_after_term": sum(1 for k in termed.values() if starts[k["tag"]] > 1),
                    "step_attempts": dict(attempts), "processes_alive": coord.alive() and worker.alive(), "prefix": env.prefix})
        res["checks"] = {"no handler started again after SIGTERM": res["restarted_after_term"] == 0}
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
