"""Cluster-wide limits hold across processes: with 3 coordinator processes (each runs a limiter), 8 partitions and 4
worker processes on one broker, the requests that reach the workers never exceed a rate by more than 5 % over any
10 s window and never exceed a concurrency.

The handler (``chaos_limited``, tools/chaos_data) appends when each request starts and ends to a file every worker
shares; the windows are counted from those arrival times, not from the limiter's own books.
"""
from __future__ import annotations

import json
import time

import pytest

from legato.tools.chaos_limits import busiest_window, most_at_once
from legato.tools.harness import Env, Scene, group_members, trigger, wait_ready
from legato.topics.limits import LimitSpec
from legato.workflows.limiter import WINDOW_MS

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

RATE = LimitSpec(requests_per_minute=600, concurrency=30)  # chaos_rated.yaml
RATED_RUNS = 150  # 15 s at 10 a second
PAIR_RUNS = 40  # chaos_limited.yaml: 2 at a time


async def test_three_coordinators_and_four_workers_keep_a_rate_within_five_percent_and_a_concurrency(kafka_bootstrap, tmp_path):
    log = tmp_path / "limits.jsonl"
    env = Env(kafka_bootstrap, tmp_path, partitions=8, extra_env={"CHAOS_LIMITS_LOG": str(log)}, loglevel="info")
    async with Scene(env) as scene:
        # one coordinator first: coordinators starting together contend for the deployer's transactional id
        procs = [env.process("coordinator", "c0")] + [env.process("worker", f"w{i}") for i in range(4)]
        ready_s = await wait_ready(env, scene.prod, scene.watch, procs, timeout=240)
        procs += [env.process("coordinator", f"c{i}") for i in (1, 2)]
        assert await group_members(kafka_bootstrap, env.topics.limiter_group, 3) == 3, env.logs()
        assert await group_members(kafka_bootstrap, env.topics.coordinator_group, 3) == 3, env.logs()
        began = time.monotonic()
        runs = set()
        for i in range(RATED_RUNS):
            # one in five holds its place 1.5 s, and the others for the round trip through the coordinators
            seconds = 1.5 if i % 5 == 0 else 0.02
            run_id = f"rated-{i}"
            await trigger(scene.prod, env, "chaos_rated", {"tag": run_id, "key": "cluster", "seconds": seconds}, run_id)
            runs.add(run_id)
        for i in range(PAIR_RUNS):
            run_id = f"pair-{i}"
            await trigger(scene.prod, env, "chaos_limited", {"tag": run_id, "key": "cluster", "seconds": 0.3}, run_id)
            runs.add(run_id)
        assert await scene.watch.wait(runs, 150, procs), f"{len(runs) - scene.watch.done(runs)} runs unfinished\n{env.logs()}"
        assert {scene.watch.terminal[r][-1]["type"] for r in runs} == {"run.completed"}
        ran_s = time.monotonic() - began
    notes = [json.loads(line) for line in log.read_text().splitlines()]
    rated = [n for n in notes if n["tag"].startswith("rated-")]
    pair = [n for n in notes if n["tag"].startswith("pair-")]
    assert len({n["pid"] for n in notes}) == 4, "the requests did not reach all four workers"
    starts = [n["t"] for n in rated if n["event"] == "start"]
    assert len(starts) == RATED_RUNS
    budget = RATE.requests_per_minute * WINDOW_MS / 60_000
    busiest = busiest_window(starts)
    print(f"ready in {ready_s:.1f} s, runs in {ran_s:.1f} s; busiest 10 s: {busiest} (budget {RATE.requests_per_minute / 6:.0f}), "
          f"most at once: {most_at_once(rated)} (limit {RATE.concurrency}), pair: {most_at_once(pair)} (limit 2)")
    assert busiest <= budget * 1.05, f"{busiest} requests in 10 s against a budget of {budget:.0f}"
    assert busiest >= budget * 0.9, f"the limit was not saturated ({busiest} in the busiest 10 s): the test proves nothing"
    assert most_at_once(rated) <= RATE.concurrency
    assert most_at_once(pair) == 2
