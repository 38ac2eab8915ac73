"""``legato bench limits``: what a cluster-wide limit admits and what it costs, measured at the workers.

One coordinator (with its limiter) and two workers from tools/chaos_data on the bench's broker, fresh topics:

- **cost**: ``chaos_rated`` runs (a step behind 600 requests/min) and ``chaos_free`` runs (the same step, no limit)
  interleaved at 2.5 runs/s each, a quarter of the budget: the p50 / p95 of each run's duration (one step each, the
  handler 20 ms), so the difference is the round trip through the limiter; ``chaos_keyed`` runs (the same step in a
  workflow with a concurrency key, each run its own key, so it is always free) interleaved with them: the round trip
  plus the wait for every trigger partition's mark to pass the run's trigger time (keyed runs start in trigger order);
- **saturated**: ``--runs`` ``chaos_rated`` runs triggered at once: the achieved rate, the busiest 10 s of requests
  reaching the workers against the budget (goal: within 5 %), and the most requests in handlers at once against its
  concurrency.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from legato.streams.config import Settings
from legato.tools.bench import Report, Row, _percentile
from legato.tools.chaos_limits import RATED, busiest_window, most_at_once, read_notes
from legato.tools.harness import Env, Scene, trigger, wait_ready
from legato.workflows.limiter import WINDOW_MS

COST_RUNS = 60  # of each workflow
COST_RATE = 2.5  # runs/s of each


async def _bench(settings: Settings, runs: int) -> dict[str, Any]:
    env = Env(settings.bootstrap, partitions=settings.partitions)
    log = env.workdir / "limits.jsonl"
    env.env["CHAOS_LIMITS_LOG"] = str(log)
    async with Scene(env) as scene:
        procs = [env.process("coordinator"), env.process("worker", "w0"), env.process("worker", "w1")]
        await wait_ready(env, scene.prod, scene.watch, procs)
        warm = "warm-limit"
        await trigger(scene.prod, env, "chaos_rated", {"tag": warm, "key": "cost", "seconds": 0.02}, warm)
        await scene.watch.wait({warm}, 120)
        cost: dict[str, list[str]] = {"chaos_rated": [], "chaos_free": [], "chaos_keyed": []}
        for i in range(COST_RUNS):
            for workflow in cost:
                run_id = f"{workflow}-cost-{i}"
                key = f"cost-{i}" if workflow == "chaos_keyed" else "cost"  # a free concurrency key each
                await trigger(scene.prod, env, workflow, {"tag": run_id, "key": key, "seconds": 0.02}, run_id)
                cost[workflow].append(run_id)
            await asyncio.sleep(1 / COST_RATE)
        await scene.watch.wait({r for ids in cost.values() for r in ids}, 300)
        durations = {w: [scene.watch.terminal[r][0]["duration_ms"] for r in ids if r in scene.watch.terminal] for w, ids in cost.items()}
        saturated = [f"rated-{i}" for i in range(runs)]
        began = time.monotonic()
        for run_id in saturated:
            await trigger(scene.prod, env, "chaos_rated", {"tag": run_id, "key": "saturated", "seconds": 0.02}, run_id)
        finished = await scene.watch.wait(set(saturated), 60 + runs / 5)
        elapsed = time.monotonic() - began
    notes = [n for n in read_notes(log) if n["key"] == "saturated"]
    starts = sorted(n["t"] for n in notes if n["event"] == "start")
    return {"durations": durations, "finished": finished, "elapsed": elapsed, "starts": starts, "at_once": most_at_once(notes)}


def bench_limits(settings: Settings, runs: int) -> Report:
    runs = min(runs, 600)
    r = asyncio.run(_bench(settings, runs))
    report = Report(f"legato bench limits --runs {runs}")
    limited, free = r["durations"]["chaos_rated"], r["durations"]["chaos_free"]
    p50 = (_percentile(limited, 50), _percentile(free, 50))
    p95 = (_percentile(limited, 95), _percentile(free, 95))
    report.rows.append(Row("run of one step, p50 (behind a limit / without)", f"{p50[0]:.0f} ms", f"{p50[1]:.0f} ms", f"+{p50[0] - p50[1]:.0f} ms", "-", "-"))
    report.rows.append(Row("run of one step, p95 (behind a limit / without)", f"{p95[0]:.0f} ms", f"{p95[1]:.0f} ms", f"+{p95[0] - p95[1]:.0f} ms", "-", "-"))
    keyed = r["durations"]["chaos_keyed"]
    k50, k95 = _percentile(keyed, 50), _percentile(keyed, 95)
    report.rows.append(Row("run of one step, p50 (free concurrency key / none)", f"{k50:.0f} ms", f"{p50[1]:.0f} ms", f"+{k50 - p50[1]:.0f} ms", "-", "-"))
    report.rows.append(Row("run of one step, p95 (free concurrency key / none)", f"{k95:.0f} ms", f"{p95[1]:.0f} ms", f"+{k95 - p95[1]:.0f} ms", "-", "-"))
    starts = r["starts"]
    budget = RATED.requests_per_minute * WINDOW_MS / 60_000
    spread = starts[-1] - starts[0] if len(starts) > 1 else 0.0
    achieved = (len(starts) - 1) / spread * 60 if spread else 0.0
    busiest = busiest_window(starts)
    report.rows.append(Row("achieved rate, saturated (requests/min at the workers)", f"{achieved:.0f}", f"{RATED.requests_per_minute:.0f} (budget)",
                           f"{achieved / RATED.requests_per_minute:.3f}", "≤ 1.05", "yes" if achieved <= RATED.requests_per_minute * 1.05 else "NO"))
    report.rows.append(Row("busiest 10 s of requests at the workers", str(busiest), f"{budget:.0f} (budget)", f"{busiest / budget:.3f}", "≤ 1.05",
                           "yes" if busiest <= budget * 1.05 else "NO"))
    report.rows.append(Row("most requests in handlers at once", str(r["at_once"]), f"{RATED.concurrency} (concurrency)", "-", "≤ limit",
                           "yes" if r["at_once"] <= (RATED.concurrency or 0) else "NO"))
    report.notes.append(f"{len(starts)} of {runs} saturated requests reached a worker in {r['elapsed']:.1f} s (all finished: {r['finished']}); "
                        f"cost: {len(limited)} + {len(free)} + {len(keyed)} runs interleaved at {COST_RATE} runs/s each; one coordinator, two workers, "
                        f"{settings.partitions} partitions; handlers 20 ms.")
    return report
