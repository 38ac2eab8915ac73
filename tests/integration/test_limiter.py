"""Cluster-wide limits on the real broker: the limiter inside ``legato coordinator`` grants a limited step, keeps a
workflow's concurrency key to one run at a time in trigger order, lets higher priorities go first through a saturated
limit, pauses a key after a 429, and survives a coordinator SIGKILL with no grant lost and none doubled.

Two coordinator processes (each runs a limiter) and one worker, from tools/chaos_data (``chaos_limited`` appends when
each request starts and ends to ``CHAOS_LIMITS_LOG``).
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
import pytest_asyncio

from legato.streams.kafka_io import partition_for
from legato.tools.chaos_limits import in_trigger_order, most_at_once, starts
from legato.tools.harness import Env, Proc, Scene, count_by_request, wait_ready
from legato.topics.limits import limit_key

_OPENED = re.compile(r"partition (?P<p>\d+): \d+ (?P<what>runs|keys) loaded")
"""The line a coordinator (``runs``) or its limiter (``keys``) logs when it has opened a partition."""

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


class Limits:
    def __init__(self, scene: Scene, log: Path):
        self.scene = scene
        self.env = scene.env
        self.log = log

    async def trigger(self, workflow: str, input: dict, priority: int | None = None, run_id: str | None = None) -> str:
        run_id = run_id or f"{workflow}-{uuid.uuid4().hex[:10]}"
        record = {"workflow": workflow, "input": input, "run_id": run_id, **({"priority": priority} if priority else {})}
        await self.scene.prod.send_and_wait(self.env.topics.triggers, orjson.dumps(record), key=run_id.encode())
        return run_id

    async def finish(self, run_ids: set[str], timeout: float = 90.0) -> dict[str, str]:
        if not await self.scene.watch.wait(run_ids, timeout, self.env.procs):
            raise AssertionError(f"{len(run_ids) - self.scene.watch.done(run_ids)} runs unfinished after {timeout}s\n{self.env.logs()}")
        return {r: self.scene.watch.terminal[r][-1]["type"] for r in run_ids}

    def _owners(self, what: str) -> dict[int, Proc]:
        """Partition → the live coordinator process that opened it last, from their logs: ``what`` is ``runs`` (its
        coordinator's input partitions) or ``keys`` (its limiter's partitions of the limits topic)."""
        opened: dict[int, tuple[str, Proc]] = {}
        for proc in self.env.procs:
            if proc.name.startswith("c") and proc.alive():
                for line in (self.env.workdir / f"{proc.name}.log").read_text(errors="replace").splitlines():
                    found = _OPENED.search(line)
                    if found and found["what"] == what and (int(found["p"]) not in opened or opened[int(found["p"])][0] <= line[:23]):
                        opened[int(found["p"])] = (line[:23], proc)
        return {p: proc for p, (_, proc) in opened.items()}

    def limiter_of(self, key: str) -> Proc:
        """The coordinator process whose limiter opened the partition of ``key`` last."""
        partition = partition_for(key.encode(), self.env.partitions)
        owner = self._owners("keys").get(partition)
        assert owner is not None, f"no limiter opened partition {partition}"
        return owner

    def coordinator_partitions(self, proc: Proc) -> set[int]:
        """The input partitions ``proc``'s coordinator opened last among the coordinators."""
        return {p for p, owner in self._owners("runs").items() if owner is proc}

    def notes(self, key: str | None = None) -> list[dict]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [n for n in map(json.loads, lines) if key is None or n["key"] == key]

    async def wait_note(self, event: str, tag: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [n for n in self.notes() if n["event"] == event and n["tag"] == tag]
            if found:
                return found[0]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {event} of {tag} within {timeout}s\n{self.env.logs()}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def limits(kafka_bootstrap, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("limits")
    log = workdir / "limits.jsonl"
    env = Env(kafka_bootstrap, workdir, partitions=4, extra_env={"LEGATO_SESSION_TIMEOUT": "2", "CHAOS_LIMITS_LOG": str(log)}, loglevel="info")
    async with Scene(env, [env.topics.coordinator, env.topics.completions, env.topics.requests("chaos_limited")]) as scene:
        procs = [env.process("coordinator", "c1"), env.process("coordinator", "c2"), env.process("worker")]
        await wait_ready(env, scene.prod, scene.watch, procs, timeout=180)
        harness = Limits(scene, log)
        # the limiter's group has formed once a limited step runs
        first = await harness.trigger("chaos_limited", {"tag": "warm", "key": "warm", "seconds": 0})
        assert await harness.finish({first}, timeout=120) == {first: "run.completed"}
        yield harness


async def test_a_limited_step_runs_and_finishes(limits):
    run = await limits.trigger("chaos_limited", {"tag": "one", "key": "solo", "seconds": 0.1})
    assert await limits.finish({run}) == {run: "run.completed"}
    assert starts(limits.notes("solo")) == ["one"]


async def test_a_concurrency_key_runs_one_at_a_time_in_trigger_order(limits):
    order = []
    for i in range(6):
        order.append(await limits.trigger("chaos_keyed", {"tag": f"a{i}", "key": "cust-a", "seconds": 0.3}))
        await asyncio.sleep(0.05)
    other = await limits.trigger("chaos_keyed", {"tag": "b0", "key": "cust-b", "seconds": 0.3})
    outcome = await limits.finish({*order, other})
    assert set(outcome.values()) == {"run.completed"}, outcome
    a = limits.notes("cust-a")
    assert in_trigger_order(starts(a), [f"a{i}" for i in range(6)]), starts(a)
    assert most_at_once(a) == 1
    # another key does not wait for this one: b0 ran while the a runs were queued
    b_start = [n["t"] for n in limits.notes("cust-b") if n["event"] == "start"][0]
    assert b_start < max(n["t"] for n in a if n["event"] == "start")


async def test_with_a_saturated_limit_higher_priority_goes_first(limits):
    blocker = await limits.trigger("chaos_limited_one", {"tag": "blocker", "key": "prio", "seconds": 3})
    await limits.wait_note("start", "blocker")
    low = [await limits.trigger("chaos_limited_one", {"tag": f"low{i}", "key": "prio", "seconds": 0.1}, priority=1) for i in range(3)]
    await asyncio.sleep(0.3)
    high = [await limits.trigger("chaos_limited_one", {"tag": f"high{i}", "key": "prio", "seconds": 0.1}, priority=5) for i in range(3)]
    outcome = await limits.finish({blocker, *low, *high})
    assert set(outcome.values()) == {"run.completed"}, outcome
    notes = limits.notes("prio")
    order = starts(notes)
    # equals go by when their step asked, which their partitions decide each at its own pace: only the ranks are fixed
    assert order[0] == "blocker" and set(order[1:4]) == {"high0", "high1", "high2"} and set(order[4:]) == {"low0", "low1", "low2"}, order
    assert most_at_once(notes) == 1


async def test_a_429_pauses_the_whole_key(limits):
    refused = await limits.trigger("chaos_limited_one", {"tag": "refused", "key": "paused", "seconds": 0, "retry_after": 2})
    told = await limits.wait_note("429", "refused")
    same_key = await limits.trigger("chaos_limited_one", {"tag": "same", "key": "paused", "seconds": 0})
    other_key = await limits.trigger("chaos_limited_one", {"tag": "other", "key": "free", "seconds": 0})
    outcome = await limits.finish({refused, same_key, other_key})
    assert set(outcome.values()) == {"run.completed"}, outcome
    same = await limits.wait_note("start", "same")
    other = await limits.wait_note("start", "other")
    assert same["t"] - told["t"] >= 1.9, "a request of the paused key went before its retry_after"
    assert other["t"] - told["t"] < 1.9, "another key waited for the pause"


async def test_a_keyed_trigger_decided_late_after_a_coordinator_sigkill_still_starts_first(limits):
    """``a`` is triggered before ``b`` (same concurrency key) but on a partition whose coordinator was just killed:
    ``b``'s coordinator decides it at once and the key is free, yet ``b`` waits until ``a``'s partition is taken over
    and ``a`` has started and finished."""
    key = "late-order"
    survivor = limits.limiter_of(limit_key("run:chaos_keyed", key))  # the key's budget stays up
    victim = next(p for p in limits.env.procs if p.name.startswith("c") and p is not survivor and p.alive())
    owned = limits.coordinator_partitions(victim)
    assert owned, "the victim owns no partition"
    a_id = next(r for r in (f"late-a-{uuid.uuid4().hex[:8]}" for _ in range(1000)) if partition_for(r.encode(), limits.env.partitions) in owned)
    b_id = next(r for r in (f"late-b-{uuid.uuid4().hex[:8]}" for _ in range(1000)) if partition_for(r.encode(), limits.env.partitions) not in owned)
    victim.kill()
    a = await limits.trigger("chaos_keyed", {"tag": "late-a", "key": key, "seconds": 0.2}, run_id=a_id)
    await asyncio.sleep(0.3)
    b = await limits.trigger("chaos_keyed", {"tag": "late-b", "key": key, "seconds": 0.2}, run_id=b_id)
    outcome = await limits.finish({a, b}, timeout=120)
    victim.start()
    assert set(outcome.values()) == {"run.completed"}, outcome
    notes = limits.notes(key)
    assert starts(notes) == ["late-a", "late-b"], starts(notes)
    assert most_at_once(notes) == 1


async def test_the_limits_hold_through_a_coordinator_sigkill_with_no_grant_lost_or_doubled(limits):
    limited = [await limits.trigger("chaos_limited", {"tag": f"k{i}", "key": "kill", "seconds": 0.2}) for i in range(30)]
    keyed = []
    for i in range(8):
        keyed.append(await limits.trigger("chaos_keyed", {"tag": f"q{i}", "key": "kill-q", "seconds": 0.2}))
        await asyncio.sleep(0.02)
    await limits.wait_note("end", "k3")
    victim = limits.limiter_of(limit_key("chaos_pair", "kill"))  # the kill takes the key's budget with it
    victim.kill()
    outcome = await limits.finish({*limited, *keyed}, timeout=120)
    assert set(outcome.values()) == {"run.completed"}, Counter(outcome.values())  # no grant lost
    notes = limits.notes("kill")
    assert Counter(n["tag"] for n in notes if n["event"] == "start") == Counter(f"k{i}" for i in range(30)), "a request ran twice"
    assert most_at_once(notes) <= 2
    queued = limits.notes("kill-q")
    assert in_trigger_order(starts(queued), [f"q{i}" for i in range(8)]), starts(queued)
    assert most_at_once(queued) == 1
    # every acquisition was granted once, as the coordinators read them
    grants = Counter(r.json()["id"] for r in limits.scene.other.records
                     if r.topic == limits.env.topics.coordinator and r.value and r.json().get("type") == "limit.granted")
    assert grants and max(grants.values()) == 1, [g for g, n in grants.items() if n > 1]
    completed = [r for r in limits.scene.other.records if r.topic == limits.env.topics.completions and (r.json() or {}).get("status") in ("succeeded", "failed")]
    assert max(count_by_request(completed).values()) == 1
