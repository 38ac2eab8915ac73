"""``legato chaos limits``: coordinator SIGKILLs (each takes its limiter with it) while limited and keyed runs are in
flight. Judged from the topics and from when each request reached a worker (``chaos_limited`` appends its start and
end to ``CHAOS_LIMITS_LOG``): 0 lost, 0 duplicate terminal events, 0 duplicate executions, no grant doubled, the
rate within 5 % over any 10 s window, concurrencies held, keyed runs one at a time and in trigger order."""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

from legato.tools.harness import Env, Scene, group_members, trigger, wait_ready
from legato.topics.limits import LimitSpec
from legato.workflows.limiter import WINDOW_MS

RATED = LimitSpec(requests_per_minute=600, concurrency=30)  # tools/chaos_data/chaos_rated.yaml
PAIR = 2  # chaos_limited.yaml: concurrency per key
KEYS = 4  # chaos_keyed.yaml keys, one run at a time each


def busiest_window(times: list[float], window_s: float = WINDOW_MS / 1000) -> int:
    """The most arrivals in any window of ``window_s`` seconds (each window starting at an arrival)."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best


def most_at_once(notes: list[dict]) -> int:
    """The most requests between their start and their end (or 429) at any moment; at equal times an end comes first."""
    now = peak = 0
    for _, step in sorted((n["t"], 1 if n["event"] == "start" else -1) for n in notes if n["event"] in ("start", "end", "429")):
        now += step
        peak = max(peak, now)
    return peak


def starts(notes: list[dict]) -> list[str]:
    return [n["tag"] for n in sorted(notes, key=lambda n: n["t"]) if n["event"] == "start"]


def in_trigger_order(started: list[str], triggered: list[str]) -> bool:
    """The runs that waited started in trigger order: the first found its key free (another partition may have
    decided a later trigger first), every later one was the earliest trigger still waiting."""
    rest = started[1:]
    return sorted(started) == sorted(triggered) and rest == sorted(rest, key=triggered.index)


def read_notes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def scenario_limits(bootstrap: str, runs: int = 300, kills: int = 3, extra_env: dict[str, str] | None = None, timeout: float = 600.0,
                          seed: int = 1, say: Callable[[str], None] = print, workdir: Path | None = None) -> dict[str, Any]:
    """``runs`` runs behind a 600/min rate, 60 behind a concurrency of 2, 40 on 4 concurrency keys; two coordinators, one
    of them SIGKILLed and restarted ``kills`` times, 8 s apart, while they are in flight."""
    rnd = random.Random(seed)
    env = Env(bootstrap, workdir, partitions=8, extra_env=extra_env)
    log = env.workdir / "limits.jsonl"
    env.env["CHAOS_LIMITS_LOG"] = str(log)
    t0 = time.time()
    kill_log: list[dict] = []
    async with Scene(env, [env.topics.completions, env.topics.coordinator, env.topics.requests("chaos_limited"), env.topics.limits]) as scene:
        # one coordinator first: coordinators starting together contend for the deployer's transactional id
        coordinators = [env.process("coordinator", "c0")]
        workers = [env.process("worker", f"w{i}") for i in range(2)]
        ready = await wait_ready(env, scene.prod, scene.watch, coordinators + workers)
        coordinators.append(env.process("coordinator", "c1"))
        await group_members(bootstrap, env.topics.limiter_group, 2)
        say(f"  processes ready after {ready:.1f}s (prefix {env.prefix}, logs {env.workdir})")
        rated = [f"rated-{i}" for i in range(runs)]
        pair = [f"pair-{i}" for i in range(60)]
        keyed = {k: [f"keyed-{k}-{i}" for i in range(10)] for k in range(KEYS)}
        expected = {r: {"tag": r} for r in [*rated, *pair, *(r for ids in keyed.values() for r in ids)]}

        async def produce() -> None:
            for r in rated:
                await trigger(scene.prod, env, "chaos_rated", {"tag": r, "key": "chaos", "seconds": 0.02}, r)
            for r in pair:
                await trigger(scene.prod, env, "chaos_limited", {"tag": r, "key": "pair", "seconds": 0.2}, r)
            for i in range(10):
                for k, ids in keyed.items():
                    await trigger(scene.prod, env, "chaos_keyed", {"tag": ids[i], "key": f"customer-{k}", "seconds": 0.1}, ids[i])
                await asyncio.sleep(0.05)

        async def chaos() -> None:
            for n in range(kills):
                await asyncio.sleep(3.0 if n == 0 else 8.0)
                victim = rnd.choice(coordinators)
                at = victim.kill()
                done = scene.watch.done(expected)
                victim.start()
                kill_log.append({"at_s": round(at - t0, 1), "victim": victim.name, "finished_before": done})
                say(f"  SIGKILL {victim.name} at +{at - t0:.1f}s ({done}/{len(expected)} finished), restarted")

        await asyncio.gather(produce(), chaos())
        finished = await scene.watch.wait(set(expected), timeout, progress=say)
        await asyncio.sleep(3.0)  # let late duplicates arrive
        result = scene.judge(expected)
        grants = Counter(r.json()["id"] for r in scene.other.records
                         if r.topic == env.topics.coordinator and isinstance(r.json(), dict) and r.json().get("type") == "limit.granted")
        # a grant that reached its coordinator too late is given back unused and asked for again: one more grant each
        late = Counter(r.json()["id"] for r in scene.other.records
                       if r.topic == env.topics.limits and isinstance(r.json(), dict) and r.json().get("type") == "limit.release" and r.json().get("late"))
        processes_alive = all(p.alive() for p in coordinators + workers)
    notes = read_notes(log)
    by_tag: dict[str, list[dict]] = defaultdict(list)
    for n in notes:
        by_tag[n["tag"].rsplit("-", 1)[0] if n["tag"].startswith("keyed-") else n["tag"].split("-")[0]].append(n)
    rated_notes, pair_notes = by_tag["rated"], by_tag["pair"]
    budget = RATED.requests_per_minute * WINDOW_MS / 60_000
    busiest = busiest_window([n["t"] for n in rated_notes if n["event"] == "start"])
    keyed_at_once = {k: most_at_once(by_tag[f"keyed-{k}"]) for k in keyed}
    out_of_order = [k for k, ids in keyed.items() if not in_trigger_order(starts(by_tag[f"keyed-{k}"]), ids)]
    executions = Counter(n["tag"] for n in notes if n["event"] == "start")
    result.update({
        "scenario": "limits", "kills": len(kill_log), "kill_log": kill_log, "all_finished": finished, "processes_alive": processes_alive,
        "elapsed_s": round(time.time() - t0, 1), "prefix": env.prefix,
        "busiest_10s": busiest, "budget_10s": budget, "rate_max_at_once": most_at_once(rated_notes), "pair_max_at_once": most_at_once(pair_notes),
        "keyed_max_at_once": max(keyed_at_once.values(), default=0), "keys_out_of_order": out_of_order,
        "grants": sum(grants.values()), "grants_given_back_late": sum(late.values()),
        "grants_doubled": sum(max(0, v - 1 - late[i]) for i, v in grants.items()),
        "handler_starts_repeated": sum(v - 1 for v in executions.values()),
    })
    result["checks"] = {
        "rate within 5 % over any 10 s": busiest <= budget * 1.05,
        "concurrency held": result["rate_max_at_once"] <= (RATED.concurrency or 0) and result["pair_max_at_once"] <= PAIR,
        "keyed runs one at a time": result["keyed_max_at_once"] <= 1,
        "keyed runs in trigger order": not out_of_order,
        "no grant doubled": result["grants_doubled"] == 0,
        "no duplicate execution": result["duplicate_executions"] == 0,
    }
    return result
