"""Schedules on the real broker (issue 27): one run per tick, across coordinator SIGKILLs and restarts.

A schedule every second starts a run of a workflow that only sleeps (no worker needed). The coordinator is
SIGKILLed, and another one started after a pause shorter than the schedule's catchup: every tick from the first
to the last fired has exactly one run (run_ids derived from the tick), none missed, and none twice.
"""
from __future__ import annotations

import asyncio
import calendar
import os
import signal
import subprocess
import time
import uuid

import pytest
import pytest_asyncio

from legato.topics import codec
from legato.topics.client import TERMINAL_TYPES, LegatoClient
from legato.topics.codec import DecodeError
from legato.topics.models import RunEvent
from legato.workflows.schedule import iso, run_id

from tests.integration.conftest import Legato, _start, legato_executable

pytestmark = pytest.mark.asyncio(loop_scope="session")

WORKFLOW = """\
name: sched_tick
timeout: 30s
steps:
  - id: nap
    sleep: 200ms
"""
SLOW_WORKFLOW = """\
name: sched_slow
timeout: 30s
steps:
  - id: nap
    sleep: 2500ms
"""
READY_S = 180.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def schedule_system(kafka_bootstrap, tmp_path_factory):
    prefix = f"sc{uuid.uuid4().hex[:12]}"
    workdir = tmp_path_factory.mktemp("legato-schedules")
    (workdir / "workflows").mkdir()
    (workdir / "workflows" / "sched_tick.yaml").write_text(WORKFLOW, encoding="utf-8")
    (workdir / "workflows" / "sched_slow.yaml").write_text(SLOW_WORKFLOW, encoding="utf-8")
    env = {**os.environ, "LEGATO_BOOTSTRAP": kafka_bootstrap, "LEGATO_TOPIC_PREFIX": prefix, "LEGATO_WORKFLOWS": str(workdir / "workflows"),
           "LEGATO_LOGLEVEL": "info", "LEGATO_SESSION_TIMEOUT": "6", "PYTHONUNBUFFERED": "1"}
    env.pop("LEGATO_HANDLERS", None)
    env.pop("LEGATO_METRICS_PORT", None)
    harness = Legato(kafka_bootstrap, prefix, env, workdir)
    try:
        harness.client = LegatoClient(kafka_bootstrap, prefix)
        await harness.client.__aenter__()
        yield harness
    finally:
        if harness.client is not None:
            await harness.client.__aexit__(None, None, None)
        for s in harness.services:
            s.stop()


def cli(harness: Legato, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([legato_executable(), "schedule", *args], env=harness.env, capture_output=True, text=True, timeout=120)


async def schedule_runs(harness: Legato, name: str) -> dict[str, list[RunEvent]]:
    """Every RunEvent of the schedule's runs on the runs topic, by run_id."""
    out: dict[str, list[RunEvent]] = {}
    for r in await harness.read_topic(harness.topics.runs, timeout=60):
        try:
            event = codec.decode(RunEvent, r.value)
        except DecodeError:
            continue
        if event.run_id.startswith(f"sched-{name}-"):
            out.setdefault(event.run_id, []).append(event)
    return out


async def wait_for_runs(harness: Legato, name: str, count: int, timeout: float) -> dict[str, list[RunEvent]]:
    deadline = time.monotonic() + timeout
    while True:
        runs = await schedule_runs(harness, name)
        finished = [r for r, events in runs.items() if any(e.type in TERMINAL_TYPES for e in events)]
        if len(finished) >= count:
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(finished)} finished runs of {name} after {timeout}s, expected {count}:\n{harness.logs()}")
        await asyncio.sleep(1.0)


async def test_every_tick_runs_once_across_a_coordinator_sigkill(schedule_system):
    harness = schedule_system
    harness.services.append(_start("coordinator-1", ["coordinator"], harness.env, harness.workdir))
    made = cli(harness, "create", "tick", "--workflow", "sched_tick", "--every", "1s", "--catchup", "10m", "--input", '{"from": "schedule"}')
    assert made.returncode == 0, made.stderr
    again = cli(harness, "create", "tick", "--workflow", "sched_tick", "--every", "1s")
    assert again.returncode == 2 and "exists" in again.stderr, again

    await wait_for_runs(harness, "tick", 5, READY_S)
    killed = harness.services.pop()
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(10)
    await asyncio.sleep(8)  # ticks come while no coordinator runs: within catchup, fired by the next one
    harness.services.append(_start("coordinator-2", ["coordinator"], harness.env, harness.workdir))
    before = len(await schedule_runs(harness, "tick"))
    await wait_for_runs(harness, "tick", before + 12, READY_S)
    paused = cli(harness, "pause", "tick")
    assert paused.returncode == 0, paused.stderr
    await asyncio.sleep(3)  # the coordinator reads the pause; a tick decided before it may still come

    runs = await schedule_runs(harness, "tick")
    ticks = sorted(rid_ms(r) // 1000 for r in runs)
    # every second from the first tick to the last has its run: none missed across the kill and the restart
    assert ticks == list(range(ticks[0], ticks[-1] + 1)), f"missing ticks: {sorted(set(range(ticks[0], ticks[-1] + 1)) - set(ticks))}"
    assert len(ticks) >= 20
    for rid, events in runs.items():
        assert rid == run_id("tick", int(rid_ms(rid))), rid
        started = [e for e in events if e.type == "run.started"]
        terminal = [e for e in events if e.type in TERMINAL_TYPES]
        assert len(started) <= 1 and len(terminal) <= 1, f"{rid}: {[e.type for e in events]}"
    finished = [e for events in runs.values() for e in events if e.type in TERMINAL_TYPES]
    assert all(e.status == "succeeded" for e in finished), finished[:3]

    listing = cli(harness, "list")
    assert listing.returncode == 0 and "tick" in listing.stdout and "paused" in listing.stdout, listing
    shown = cli(harness, "show", "tick")
    assert shown.returncode == 0 and '"last_run_id": "sched-tick-' in shown.stdout, shown

    # backfill the first ticks again: the same run_ids, so nothing runs twice; trigger starts one manual run
    first = iso(rid_ms(min(runs)))
    backfill = cli(harness, "backfill", "tick", "--from", first, "--to", first)
    assert backfill.returncode == 0 and backfill.stdout.split() == [min(runs)], backfill
    manual = cli(harness, "trigger", "tick")
    assert manual.returncode == 0 and manual.stdout.startswith("sched-manual-tick-"), manual
    event = (await harness.wait_for({manual.stdout.strip()}, timeout=60))[manual.stdout.strip()]
    assert event.status == "succeeded", event
    for rid, events in (await schedule_runs(harness, "tick")).items():
        assert len([e for e in events if e.type == "run.started"]) <= 1, f"{rid} started twice"
    deleted = cli(harness, "delete", "tick")
    assert deleted.returncode == 0, deleted.stderr
    assert "tick" not in cli(harness, "list").stdout.split("\n", 1)[-1]


def rid_ms(rid: str) -> int:
    """The tick of a run_id ``sched-<name>-20261207T080000.437Z``."""
    stamp = rid[-len("20261207T080000.437Z"):]
    return calendar.timegm(time.strptime(stamp[:15], "%Y%m%dT%H%M%S")) * 1000 + int(stamp[16:19])


async def test_overlap_skip_starts_no_run_while_the_previous_one_is_going(schedule_system):
    harness = schedule_system
    if not any(s.proc.poll() is None for s in harness.services):
        harness.services.append(_start("coordinator-3", ["coordinator"], harness.env, harness.workdir))
    # runs take 2.5 s, ticks come every second: with skip, at most one run at a time and most ticks skipped
    made = cli(harness, "create", "slow", "--workflow", "sched_slow", "--every", "1s", "--overlap", "skip")
    assert made.returncode == 0, made.stderr
    await wait_for_runs(harness, "slow", 4, READY_S)
    assert cli(harness, "pause", "slow").returncode == 0
    await asyncio.sleep(3)
    runs = await wait_for_runs(harness, "slow", len(await schedule_runs(harness, "slow")), 60)
    spans = []
    for rid, events in runs.items():
        started = [e for e in events if e.type == "run.started"]
        ended = [e for e in events if e.type in TERMINAL_TYPES]
        assert len(started) == 1 and len(ended) == 1 and ended[0].status == "succeeded", (rid, events)
        spans.append((rid_ms(rid), started[0].started_at, ended[0].finished_at))
    spans.sort()
    for (_, _, finished), (tick, started, _) in zip(spans, spans[1:]):
        assert started >= finished, f"the run of tick {iso(tick)} started at {started}, before the previous one finished at {finished}"
    gaps = [b[0] - a[0] for a, b in zip(spans, spans[1:])]
    assert all(g >= 3000 for g in gaps), f"ticks fired while a 2.5 s run was going: {gaps}"
