"""``legato chaos payloads``: runs whose values travel by reference (claim checks) while the coordinator is SIGKILLed.

Each ``chaos_payloads`` run: an activity returns 1.5 MB (stored by reference), a condition reads its size, four map
branches return 400 kB each, and a last step receives the 1.5 MB value and the joined branch outputs (its worker
resolves 3.1 MB) and returns their sha256. The coordinator is SIGKILLed ``kills`` times while runs go on, and
restarted. Judged from the topics alone: every run ends once (``lost``, ``duplicate_terminal_events`` 0), no request
was executed twice (``duplicate_executions`` 0), and every output holds the sha256 of the texts the run's
activities made (``corrupted``: a run whose digest differs; 0).
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import time
from pathlib import Path
from typing import Any, Callable

from legato.tools.harness import Env, Scene, trigger, wait_ready

BIG = 1_500_000
PART = 400_000
PARTS = 4


def payloads_expected(n: int) -> dict[str, Any]:
    """The output a ``chaos_payloads`` run of input ``n`` ends with (chaos_handlers.chaos_blob's letters)."""
    texts = [chr(97 + n % 26) * BIG, *(chr(97 + (n + i) % 26) * PART for i in range(PARTS))]
    return {"n": n, "chars": BIG, "digest": {"chars": BIG + PARTS * PART, "sha256": hashlib.sha256("".join(texts).encode()).hexdigest()}}


async def scenario_payloads(bootstrap: str, runs: int = 40, kills: int = 3, rate: float = 2.0, seed: int = 1,
                            extra_env: dict[str, str] | None = None, timeout: float = 600.0, say: Callable[[str], None] = print,
                            workdir: Path | None = None) -> dict[str, Any]:
    rnd = random.Random(seed)
    env = Env(bootstrap, workdir, extra_env=extra_env)
    t0 = time.time()
    kill_log: list[dict] = []
    async with Scene(env, [env.topics.completions, *(env.topics.requests(a) for a in ("chaos_blob", "chaos_echo", "chaos_digest"))]) as scene:
        coord, worker = env.process("coordinator"), env.process("worker")
        watch, prod = scene.watch, scene.prod
        ready = await wait_ready(env, prod, watch, [coord, worker])
        say(f"  processes ready after {ready:.1f}s (prefix {env.prefix}, logs {env.workdir})")
        expected = {f"payloads-{i}": payloads_expected(i) for i in range(runs)}
        ids = list(expected)
        start = time.monotonic()

        async def produce_all() -> None:
            for i, rid in enumerate(ids):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await trigger(prod, env, "chaos_payloads", {"n": i, "big": BIG, "part": PART, "parts": [i + k for k in range(PARTS)]}, rid)
            await prod.flush()

        async def chaos() -> None:
            window = runs / rate
            for k in range(kills):
                await asyncio.sleep(rnd.uniform(0.5, 1.0) * window / kills)
                done_before = watch.done(ids)
                t_kill = coord.kill()
                down = rnd.uniform(0.0, 2.0)
                await asyncio.sleep(down)
                coord.start()
                kill_log.append({"at_s": round(t_kill - t0, 1), "finished_before": done_before, "down_s": round(down, 2)})
                say(f"  SIGKILL coordinator at +{t_kill - t0:.1f}s ({done_before}/{runs} finished), restarted after {down:.1f}s")

        await asyncio.gather(produce_all(), chaos())
        finished = await watch.wait(set(ids), timeout, progress=say)
        await asyncio.sleep(5.0)  # let late duplicates arrive
        result = scene.judge(expected)
        result.update({"scenario": "payloads", "kills": len(kill_log), "kill_log": kill_log, "elapsed_s": round(time.time() - t0, 1),
                       "corrupted": result["wrong_output"], "bytes_per_run": BIG + PARTS * PART, "all_finished": finished,
                       "processes_alive": coord.alive() and worker.alive(), "prefix": env.prefix,
                       "checks": {"corrupted == 0": result["wrong_output"] == 0}})
        return result
