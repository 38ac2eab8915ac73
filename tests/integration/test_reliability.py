"""Crash tests at CI size: real `legato coordinator` / `legato worker` processes SIGKILLed on a real broker.

The same scenarios run at full size with `legato chaos` (figures in RELIABILITY.md). Every test starts its own
processes with a fresh topic prefix. Consumers of the checked topics read committed records only, as
docs/concepts/guarantees.md asks of every consumer; the session timeout is 10 s (LEGATO_SESSION_TIMEOUT), so a killed
member leaves its consumer group within 10 s.
"""
from __future__ import annotations

import pytest

from legato.tools import kafka_local
from legato.tools.chaos_broker import scenario_broker
from legato.tools.chaos_deploy import scenario_deploy
from legato.tools.chaos_kills import scenario_coordinator, scenario_takeover, scenario_worker
from legato.tools.chaos_waits import scenario_timers, scenario_waits
from tests.conftest import skip_or_fail

pytestmark = pytest.mark.integration

FAST_GROUP = {"LEGATO_SESSION_TIMEOUT": "10"}


def no_loss(r: dict) -> None:
    assert r["all_finished"], r
    assert r["lost"] == 0, r
    assert r["completed"] == r["runs"], r
    assert r.get("conflicting_terminal", 0) == 0, r  # every run reached exactly one terminal *state*
    assert r.get("wrong_output", 0) == 0, r


async def test_coordinator_sigkilled_twice_loses_nothing(kafka_bootstrap, tmp_path):
    r = await scenario_coordinator(kafka_bootstrap, runs=100, kills=2, rate=20, extra_env=FAST_GROUP, timeout=150, workdir=tmp_path)
    no_loss(r)
    assert r["kills"] == 2
    assert r["succeeded"] == 100
    # a killed coordinator's open transaction is aborted by its successor: nothing it produced is seen twice
    assert r["duplicate_executions"] == 0, r
    assert r["duplicate_terminal_events"] == 0, r


async def test_worker_sigkilled_mid_activity_run_completes_and_sigterm_drains(kafka_bootstrap, tmp_path):
    r = await scenario_worker(kafka_bootstrap, runs=10, seconds=3.0, extra_env=FAST_GROUP, timeout=120, workdir=tmp_path)
    no_loss(r)
    assert r["in_flight_at_kill"] == 10 and r["in_flight_at_term"] == 10, r  # every activity was in its handler
    assert r["succeeded"] == 20, r
    assert r["restarted_after_term"] == 0 and r["duplicate_executions"] == 0, r  # the SIGTERMed worker drained


async def test_timers_fire_after_restart(kafka_bootstrap, tmp_path):
    r = await scenario_timers(kafka_bootstrap, runs=5, extra_env=FAST_GROUP, timeout=120, workdir=tmp_path)
    assert r["all_finished"] and r["lost"] == 0, r
    assert r["right_output"] == 5, r  # ended by the on_error default after both attempts timed out
    assert r["requests_by_attempt"] == {1: 5, 2: 5} or (r["requests_by_attempt"].get(2, 0) >= 5), r  # the back-off fired
    assert [p["phase"] for p in r["phases"]] == ["step timeout", "retry back-off"]
    assert all(p["restarted_s_after_due"] > 0 for p in r["phases"]), r  # both timers were due while it was dead


async def test_waits_and_sleeps_survive_a_coordinator_sigkill(kafka_bootstrap, tmp_path):
    r = await scenario_waits(kafka_bootstrap, runs=20, extra_env=FAST_GROUP, timeout=120, workdir=tmp_path, spread_s=4.0, lead_s=12.0)
    no_loss(r)
    assert r["succeeded"] == 40, r  # 20 waits ended with their signal's data, 20 sleeps with their input
    assert r["ended_before_kill"] == 0 and r["asleep_at_kill"] == 20, r  # killed while every run waited
    assert r["due_while_down"] > 0, r
    assert r["ended_early"] == 0 and r["waits_ended_before_their_signal"] == 0, r
    assert r["duplicate_terminal_events"] == 0, r  # each signal was sent twice with one signal_id


async def test_v2_deployed_mid_flight_with_a_coordinator_sigkill_switches_no_run(kafka_bootstrap, tmp_path):
    r = await scenario_deploy(kafka_bootstrap, runs=30, kills=1, new_runs=10, seconds=8.0, extra_env=FAST_GROUP, timeout=120, workdir=tmp_path)
    no_loss(r)  # wrong_output 0: every v1 run ended with v1's output, every later trigger with v2's
    assert r["v1_in_flight_at_deploy"] > 0 and r["kill_log"][0]["v1_in_flight"] > 0, r  # deployed and killed mid-flight
    assert r["switched_version"] == 0, r  # v1 runs: version 1 on run.started and the terminal event, only v1's step ids requested
    assert r["new_not_v2"] == 0, r
    assert r["duplicate_terminal_events"] == 0 and r["duplicate_executions"] == 0, r


async def test_survivor_takes_over_partitions_of_killed_coordinator(kafka_bootstrap, tmp_path):
    r = await scenario_takeover(kafka_bootstrap, runs=120, rate=8, extra_env=FAST_GROUP, timeout=150, workdir=tmp_path)
    no_loss(r)
    assert r["takeover_s"] is not None and r["takeover_s"] < 60, r
    assert all(g is not None for g in r["gap_by_partition_s"].values()), r  # all 8 partitions served again
    assert r["duplicate_terminal_events"] == 0 and r["duplicate_executions"] == 0, r


async def test_broker_restart_processes_reconnect(tmp_path):
    if not kafka_local.jars_present():
        skip_or_fail("Kafka jars not fetched (scripts/setup.sh fetches them)")
    r = await scenario_broker(None, runs=40, down_s=5.0, extra_env=FAST_GROUP, timeout=180, workdir=tmp_path)
    no_loss(r)
    assert r["same_pids"] and r["processes_alive"], r  # nobody restarted them
