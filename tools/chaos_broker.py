"""The ``broker`` chaos scenario: a private broker stopped and started in the middle of runs."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

from legato.tools.harness import Env, PrivateBroker, Scene, mix_expected, trigger, wait_ready


async def scenario_broker(bootstrap: str | None = None, runs: int = 200, down_s: float = 5.0, extra_env: dict[str, str] | None = None,
                          timeout: float = 600.0, say: Callable[[str], None] = print, workdir: Path | None = None) -> dict[str, Any]:
    """A private broker is stopped (SIGTERM) in the middle of runs and started again; nobody restarts the Legato
    processes. Half of the runs are triggered before the outage, half after it."""
    broker = PrivateBroker()
    await asyncio.to_thread(broker.start)
    say(f"  private broker at {broker.bootstrap} (data {broker.dir})")
    env = Env(broker.bootstrap, workdir, extra_env={"CHAOS_DELAY": "0.05", **(extra_env or {})})
    try:
        async with Scene(env, [env.topics.completions, env.topics.requests("chaos_echo")]) as scene:
            return await _broker_outage(env, scene, broker, runs, down_s, timeout, say)
    finally:
        await asyncio.to_thread(broker.cleanup)


async def _broker_outage(env: Env, scene: Scene, broker: "PrivateBroker", runs: int, down_s: float, timeout: float,
                         say: Callable[[str], None]) -> dict[str, Any]:
    coord, worker = env.process("coordinator"), env.process("worker")
    pids = (coord.proc.pid, worker.proc.pid)
    watch, prod = scene.watch, scene.prod
    await wait_ready(env, prod, watch, [coord, worker])
    expected = {f"brk-{i}": mix_expected(i) for i in range(runs)}
    ids = list(expected)
    half = runs // 2
    for i in range(half):
        await trigger(prod, env, "chaos_mix", {"n": i}, ids[i])
    await prod.flush()
    await asyncio.sleep(1.0)
    before = watch.done(ids)
    t_stop = time.time()
    await asyncio.to_thread(broker.stop)
    say(f"  broker stopped with {before}/{half} runs finished; down for {down_s}s")
    await asyncio.sleep(down_s)
    await asyncio.to_thread(broker.start)
    t_back = time.time()
    say(f"  broker back after {t_back - t_stop:.1f}s")
    for i in range(half, runs):
        await trigger(prod, env, "chaos_mix", {"n": i}, ids[i])
    await prod.flush()
    finished = await watch.wait(set(ids), timeout, progress=say)
    await asyncio.sleep(2.0)
    res = scene.judge(expected)
    ends = sorted(watch.terminal_recs[r][0].timestamp / 1000 for r in ids[:half] if r in watch.terminal_recs)
    res.update({"scenario": "broker", "kills": 1, "finished_before_outage": before, "all_finished": finished,
                "outage_s": round(t_back - t_stop, 1),
                "first_half_done_s_after_back": round(ends[-1] - t_back, 1) if ends and ends[-1] > t_back else 0.0,
                "processes_alive": coord.alive() and worker.alive(),
                "same_pids": (coord.proc.pid, worker.proc.pid) == pids and coord.starts == 1 and worker.starts == 1,
                "prefix": env.prefix})
    return res
