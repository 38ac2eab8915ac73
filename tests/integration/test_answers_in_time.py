"""A worker that answers in time never sees its run fail by timeout, also when the coordinator dies in between.

The interleavings are driven by hand, not waited for: runs of ``chaos_deadline`` (one activity, ``timeout: 1500ms``,
no retry) are triggered; once every request is on its topic the coordinator is SIGKILLed; the test, acting as an
independent worker, answers every request at once (well before its deadline) while no coordinator runs; the
coordinator is restarted only after every deadline has passed, so each step's timeout timer is overdue when the new
owner loads its partition. Two kinds of answer:

- *misplaced*: produced to another partition of the completions topic than the run's (a client whose partitioner
  is not murmur2): the coordinator task of that partition must re-key it before the run's own partition decides the
  overdue timer. Runs live on partitions 0-3 and answers go to 4-7, which a new owner opens after 0-3.
- *behind a backlog*: produced to the run's own partition after 3,000 completions for unknown runs, so the overdue
  timer's record is read long before the answer.

Every run must succeed with its worker's answer.
"""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from legato.streams.kafka_io import partition_for
from legato.tools.harness import Env, Scene, Tail, answered_in_time, trigger, wait_ready

pytestmark = pytest.mark.integration

PARTITIONS = 8
WORKFLOW = "chaos_deadline"
ACTIVITY = "deadline_answer"


def _ids(prefix: str, count: int, partitions: set[int]) -> list[str]:
    out, i = [], 0
    while len(out) < count:
        rid = f"{prefix}-{i}"
        if partition_for(rid.encode(), PARTITIONS) in partitions:
            out.append(rid)
        i += 1
    return out


async def test_answers_in_the_log_before_a_deadline_win_over_the_overdue_timer(kafka_bootstrap, tmp_path):
    env = Env(kafka_bootstrap, tmp_path, partitions=PARTITIONS, extra_env={"LEGATO_SESSION_TIMEOUT": "10"})
    requests_topic = env.topics.requests(ACTIVITY)
    async with Scene(env) as scene:
        requests = await Tail(kafka_bootstrap, [requests_topic, env.topics.completions]).start()
        try:
            coord = env.process("coordinator")
            worker = env.process("worker")  # serves chaos_probe only
            await wait_ready(env, scene.prod, scene.watch, [coord, worker])
            misplaced = _ids("misplaced", 12, {0, 1, 2, 3})
            backlogged = _ids("backlogged", 6, {2})
            runs = misplaced + backlogged
            for n, rid in enumerate(runs):
                await trigger(scene.prod, env, WORKFLOW, {"n": n}, rid)
            asked: dict[str, dict] = {}
            deadline = time.monotonic() + 60
            while len(asked) < len(runs):
                assert time.monotonic() < deadline, f"requests seen: {sorted(asked)}\n{env.logs()}"
                for rec in requests.records:
                    value = rec.json()
                    if rec.topic == requests_topic and isinstance(value, dict) and value.get("run_id") in runs:
                        asked.setdefault(value["run_id"], value)
                await asyncio.sleep(0.02)
            coord.kill()

            def answer(rid: str) -> bytes:
                req = asked[rid]
                return orjson.dumps({"request_id": req["request_id"], "run_id": rid, "step_id": req["step_id"], "attempt": req["attempt"],
                                     "status": "succeeded", "output": {"by": "hand", "run": rid}})

            sends = [await scene.prod.send(env.topics.completions, answer(rid), key=rid.encode(),
                                           partition=(partition_for(rid.encode(), PARTITIONS) + 4) % PARTITIONS) for rid in misplaced]
            ghosts = _ids("ghost", 3000, {2})
            for rid in ghosts:
                ghost = {"request_id": f"{rid}/x/1", "run_id": rid, "step_id": "x", "attempt": 1, "status": "succeeded"}
                sends.append(await scene.prod.send(env.topics.completions, orjson.dumps(ghost), key=rid.encode(), partition=2))
            sends += [await scene.prod.send(env.topics.completions, answer(rid), key=rid.encode(), partition=2) for rid in backlogged]
            for fut in sends:
                await fut
            last_deadline = max(req["deadline"] for req in asked.values()) / 1000
            answered_at = time.time()
            assert answered_at < min(req["deadline"] for req in asked.values()) / 1000, "the answers must be in time for this test to mean anything"
            await asyncio.sleep(max(0.0, last_deadline - time.time()) + 1.0)
            coord.start()  # every timeout timer is overdue now
            assert await scene.watch.wait(set(runs), 90), env.logs()
            ends = {rid: scene.watch.terminal[rid][0] for rid in runs}
            failed = {rid for rid, event in ends.items() if event["status"] != "succeeded"}
            late = answered_in_time(failed, [r for r in requests.records if r.topic == requests_topic],
                                    [r for r in requests.records if r.topic == env.topics.completions])
            assert not failed, {"failed": sorted(failed), "answered in time": late, "errors": {r: ends[r].get("error") for r in sorted(failed)[:3]}}
            assert all(ends[rid]["output"] == {"by": "hand", "run": rid} for rid in runs)
            assert all(len(scene.watch.terminal[rid]) == 1 for rid in runs)
        finally:
            await requests.stop()
