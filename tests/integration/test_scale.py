"""Coordinators and workers scaled out and back in while runs are in flight (``legato chaos scale`` at CI size).

Each role goes 1 -> 2 -> 1 (a process started, then stopped with SIGTERM) while runs are triggered at a steady rate
(at least ``RUNS``, and on until the last step is over), so runs are in flight at every step: no run is lost or ends
twice, and a request runs twice only when it was in flight at a step (a worker's unanswered requests move with its
partitions; a coordinator taking a partition over re-issues the requests it has no completion for yet), at most once
per run in flight then for each of its branches (``chaos_mix`` has at most two requests out at once).
"""
from __future__ import annotations

import pytest

from legato.tools.chaos_scale import scenario_scale

pytestmark = pytest.mark.asyncio(loop_scope="session")
RUNS = 120
STEPS = (("coordinator", +1), ("worker", +1), ("coordinator", -1), ("worker", -1))


async def test_scaling_coordinators_and_workers_out_and_in_loses_and_duplicates_no_run(kafka_bootstrap, tmp_path):
    r = await scenario_scale(kafka_bootstrap, runs=RUNS, rate=20.0, steps=STEPS, extra_env={"LEGATO_SESSION_TIMEOUT": "6"},
                             timeout=120.0, say=lambda _: None, workdir=tmp_path, partitions=4)
    assert r["runs"] >= RUNS and r["all_finished"] and r["lost"] == 0 and r["completed"] == r["runs"], r
    assert r["wrong_output"] == 0 and r["conflicting_terminal"] == 0, r
    assert r["duplicate_terminal_events"] == 0, r
    assert r["processes_alive"], r
    assert len(r["steps"]) == len(STEPS) and all(s["in_flight"] > 0 for s in r["steps"]), r["steps"]
    assert r["duplicates_unexplained"] == 0, r["unexplained_examples"]
    assert r["duplicate_executions"] <= 2 * sum(s["in_flight"] for s in r["steps"]), r
