"""The ``deploy`` chaos scenario: v2 of a workflow deployed while v1 runs are in flight and the coordinator is killed."""
from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import orjson

from legato.tools.harness import DATA, Env, Kill, Rec, Scene, kill_and_restart, legato_executable, send_all, trigger, wait_ready


V1_STEPS = {"v1_prep", "v1_slow", "v1_done"}
V2_STEPS = {"v2_prep", "v2_slow", "v2_check", "v2_done"}
V2_FILE = DATA / "v2" / "chaos_deploy.yaml"
"""chaos_deploy v2, deployed by the ``deploy`` scenario with ``legato deploy`` while v1 runs are in flight."""


def deploy_expected(n: int, version: int) -> dict[str, Any]:
    return {"n": n, "version": 1, "tag": "v1"} if version == 1 else {"n": n, "version": 2, "tag": "v2", "checked": True}


async def scenario_deploy(bootstrap: str, runs: int = 1000, kills: int = 1, new_runs: int | None = None, seconds: float | None = None, seed: int = 1,
                          extra_env: dict[str, str] | None = None, timeout: float = 900.0, say: Callable[[str], None] = print,
                          workdir: Path | None = None) -> dict[str, Any]:
    """``runs`` chaos_deploy v1 runs (three steps, the middle one ``seconds`` long in a worker of 64 slots) are
    started; once every one has started with version 1, v2 (other step ids, one step more) is deployed with
    ``legato deploy``, and the coordinator is SIGKILLed ``kills`` times while v1 runs are still in flight (restarted
    after 0-2 s). ``new_runs`` triggers without a version follow the deploy, half before the first kill and half after
    the last restart. Judged from the topics: every run ends once with its version's output; every v1 run's events
    say ``version: 1`` and it only ever requested v1's step ids; every run triggered after the deploy is v2."""
    rnd = random.Random(seed)
    new_runs = max(10, runs // 10) if new_runs is None else new_runs
    # the worker runs 64 slow steps at a time: keep v1 runs in flight for about 20 s per kill (a restart takes ~12 s)
    seconds = max(2.0, round(20.0 * kills * 64 / runs, 1)) if seconds is None else seconds
    env = Env(bootstrap, workdir, extra_env=extra_env)
    t0 = time.time()
    kill_log: list[dict] = []
    started_version: dict[str, list[int]] = defaultdict(list)
    async with Scene(env, [env.topics.completions, env.topics.requests("chaos_echo"), env.topics.requests("chaos_slow")]) as scene:
        def on_run(rec: Rec) -> None:
            v = rec.json()
            if isinstance(v, dict) and v.get("type") == "run.started":
                started_version[v["run_id"]].append(v.get("version"))

        scene.tail.listeners.append(on_run)
        coord, worker = env.process("coordinator"), env.process("worker")
        watch, prod = scene.watch, scene.prod
        ready = await wait_ready(env, prod, watch, [coord, worker])
        say(f"  processes ready after {ready:.1f}s (prefix {env.prefix}, logs {env.workdir})")
        v1_ids = [f"v1-{i}" for i in range(runs)]
        await send_all(prod, env.topics.triggers, [(rid.encode(), orjson.dumps({"workflow": "chaos_deploy", "input": {"n": i, "seconds": seconds}, "run_id": rid}))
                                                   for i, rid in enumerate(v1_ids)])
        deadline = time.monotonic() + timeout
        while sum(1 for rid in v1_ids if rid in started_version) < runs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {sum(1 for r in v1_ids if r in started_version)} of {runs} v1 runs started:\n{env.logs()}")
            await asyncio.sleep(0.1)
        in_flight_at_deploy = runs - watch.done(v1_ids)
        say(f"  {runs} v1 runs started in {time.time() - t0:.1f}s, {in_flight_at_deploy} in flight; deploying v2 with legato deploy")
        deployed = await asyncio.to_thread(subprocess.run, [legato_executable(), "deploy", str(V2_FILE)], env=env.env, cwd=env.workdir,
                                           capture_output=True, text=True, timeout=120)
        if deployed.returncode != 0:
            raise RuntimeError(f"legato deploy failed: {deployed.stdout}{deployed.stderr}")
        t_deploy = time.time()
        # the coordinator follows the definitions topic: probe until a new run starts with v2 (then every later one does)
        probes: list[str] = []
        while not any(2 in started_version.get(p, []) for p in probes):
            if time.time() - t_deploy > 60:
                raise RuntimeError(f"no run started with v2 within 60 s of the deploy:\n{env.logs()}")
            probes.append(f"v2probe-{len(probes)}")
            await trigger(prod, env, "chaos_deploy", {"n": -len(probes), "seconds": 0}, probes[-1])
            await asyncio.sleep(0.3)
        seen_v2_s = time.time() - t_deploy
        new_ids = [f"v2-{i}" for i in range(new_runs)]
        first_half = new_runs // 2

        async def send_new(ids: list[str], offset: int) -> None:
            await send_all(prod, env.topics.triggers, [(rid.encode(), orjson.dumps({"workflow": "chaos_deploy", "input": {"n": offset + i, "seconds": seconds},
                                                                                    "run_id": rid})) for i, rid in enumerate(ids)])

        await send_new(new_ids[:first_half], 0)
        last: Kill | None = None
        for _ in range(kills):
            # kill a coordinator that is serving (after the first kill: once it has finished runs again), with v1 runs in flight
            last = await kill_and_restart(coord, watch, v1_ids, rnd, last, settle=(0.5, 2.0))
            v1_in_flight = runs - last.done_before
            kill_log.append({"at_s": round(last.at - t0, 1), "v1_in_flight": v1_in_flight, "down_s": round(last.down_s, 2)})
            say(f"  SIGKILL coordinator at +{last.at - t0:.1f}s with {v1_in_flight}/{runs} v1 runs in flight, restarted after {last.down_s:.1f}s")
        await send_new(new_ids[first_half:], first_half)
        await prod.flush()
        finished = await watch.wait(set(v1_ids) | set(new_ids) | set(probes), timeout, progress=say)
        await asyncio.sleep(5.0)  # let late duplicates arrive
        expected = {rid: deploy_expected(i, 1) for i, rid in enumerate(v1_ids)}
        expected.update({rid: deploy_expected(i, 2) for i, rid in enumerate(new_ids)})
        expected.update({rid: None for rid in probes})
        result = scene.judge(expected)
        steps_of: dict[str, set[str]] = defaultdict(set)
        for r in scene.other.records:
            v = r.json()
            if r.topic != env.topics.completions and isinstance(v, dict) and isinstance(v.get("step_id"), str):
                steps_of[v.get("run_id")].add(v["step_id"])

        def switched(rid: str, version: int, steps: set[str]) -> bool:
            """Started, ended or requested anything other than ``version``'s."""
            events = watch.terminal.get(rid, [])
            return (set(started_version.get(rid, [])) != {version} or any(e.get("version") != version for e in events)
                    or not steps_of.get(rid) or not steps_of[rid] <= steps)

        v1_switched = sorted(rid for rid in v1_ids if switched(rid, 1, V1_STEPS))
        new_not_v2 = sorted(rid for rid in new_ids if switched(rid, 2, V2_STEPS))
        elapsed = time.time() - t0
        result.update({
            "scenario": "deploy", "kills": len(kill_log), "v1_runs": runs, "v2_runs": new_runs, "v1_in_flight_at_deploy": in_flight_at_deploy,
            "deployed": deployed.stdout.strip(), "v2_seen_s_after_deploy": round(seen_v2_s, 2), "probes": len(probes),
            "switched_version": len(v1_switched), "switched_examples": [(r, started_version.get(r), sorted(steps_of.get(r, ()))) for r in v1_switched[:3]],
            "new_not_v2": len(new_not_v2), "new_not_v2_examples": [(r, started_version.get(r), sorted(steps_of.get(r, ()))) for r in new_not_v2[:3]],
            "kill_log": kill_log, "elapsed_s": round(elapsed, 1), "all_finished": finished,
            "processes_alive": coord.alive() and worker.alive(), "seconds": seconds, "prefix": env.prefix,
        })
        return result
