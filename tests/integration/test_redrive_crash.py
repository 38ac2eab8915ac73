"""A redrive survives coordinator SIGKILLs, on the real broker (issue 11, §4).

Its own ``legato coordinator`` and ``legato worker`` processes (``legato.tools.harness``: a fresh topic prefix and data
dirs), so killing the coordinator disturbs no other test. A run fails inside the parallel of its step 2 of 3 (one
branch's handler fails the first call of each run: the "fixed worker" then succeeds); ``run.redrive_requested`` is
produced and the coordinator is SIGKILLed right after; a fresh one takes over and resumes the run; it is SIGKILLed
again while the redriven branch's activity is in flight, and a third one finishes the run. Read committed, the run
has exactly one ``run.redriven`` and one ``run.completed`` with ``redrives: 1``, and step 1 ran once in total.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from legato.tools.harness import DATA, Env, HANDLERS_MODULE, Scene, Tail, trigger, wait_ready
from tests.integration.conftest import WORKFLOWS_DIR

pytestmark = pytest.mark.integration

WORKFLOW = """\
name: redrive_crash
steps:
  - {id: one, activity: e2e_counted, input: {key: "${ input.key }", value: 1}}
  - id: two
    parallel:
      branches:
        flaky: [{id: flaky, activity: e2e_flaky, input: {run_id: "${ input.key }"}, retry: {max_attempts: 1}}]
        slow: [{id: slow, activity: e2e_sleep, input: {seconds: 3, tag: "${ input.key }"}}]
  - {id: three, activity: e2e_counted, input: {key: "${ input.key }-three", value: 3}}
output: "{'one': steps.one.output.call, 'two': steps.two.output.flaky.attempts, 'three': steps.three.output.call}"
"""
ACTIVITIES = ["e2e_counted", "e2e_flaky", "e2e_sleep"]
TIMEOUT_S = 120.0


async def _until(what: str, check, timeout: float = TIMEOUT_S, env: Env | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout}s" + (f"\n{env.logs()}" if env else ""))
        await asyncio.sleep(0.05)


async def _read_to_end(bootstrap: str, topics: list[str], timeout: float = 30.0) -> list[dict]:
    """The committed JSON objects of ``topics``, from the beginning to the end offsets seen when reading starts."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, isolation_level="read_committed",
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(await _partitions(consumer, t))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while not all([await consumer.position(tp) >= ends[tp] for tp in tps]):
            assert time.monotonic() < deadline, f"could not read {topics} to their end within {timeout}s"
            for msgs in (await consumer.getmany(timeout_ms=200)).values():
                out += [v for v in (orjson.loads(m.value) for m in msgs if m.value) if isinstance(v, dict)]
        return out
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        await consumer._client.force_metadata_update()  # as tests/integration/conftest.py's read_topic does
        partitions = consumer.partitions_for_topic(topic)
    assert partitions, f"topic {topic} has no partitions"
    return partitions


async def test_a_redrive_survives_coordinator_sigkills(kafka_bootstrap: str, tmp_path: Path):
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "redrive_crash.yaml").write_text(WORKFLOW, encoding="utf-8")
    env = Env(kafka_bootstrap, tmp_path / "legato", extra_env={"LEGATO_SESSION_TIMEOUT": "10"})
    env.env["LEGATO_WORKFLOWS"] = os.pathsep.join([str(DATA), str(WORKFLOWS_DIR), str(workflows)])
    env.env["LEGATO_HANDLERS"] = f"{HANDLERS_MODULE},tests.integration.e2e_handlers"
    run_id = "redrive-crash-1"
    async with Scene(env) as scene:
        coordinator = env.process("coordinator")
        worker = env.process("worker")
        await wait_ready(env, scene.prod, scene.watch, [coordinator, worker])
        requests = await Tail(kafka_bootstrap, [env.topics.requests(a) for a in ACTIVITIES]).start()
        try:
            def events() -> list[dict]:
                return [e for e in (r.json() for r in scene.tail.records) if isinstance(e, dict) and e.get("run_id") == run_id]

            def requested() -> list[str]:
                return [v["request_id"] for v in (r.json() for r in requests.records) if isinstance(v, dict) and v.get("run_id") == run_id]

            await trigger(scene.prod, env, "redrive_crash", {"key": run_id}, run_id)
            await _until("run.failed", lambda: any(e["type"] == "run.failed" for e in events()), env=env)

            redrive = orjson.dumps({"type": "run.redrive_requested", "run_id": run_id, "reason": "worker fixed"})
            await scene.prod.send_and_wait(env.topics.coordinator, redrive, key=run_id.encode())
            coordinator.kill()  # right after the redrive is requested
            coordinator.start()
            slow_again = f"{run_id}/two/slow/slow/2"
            await _until("the redriven slow branch's request", lambda: slow_again in requested(), env=env)
            coordinator.kill()  # while the redriven step is in flight (it sleeps 3 s in the worker)
            coordinator.start()
            await _until("run.completed", lambda: any(e["type"] == "run.completed" for e in events()), env=env)
            # Read again, to the end of each partition: everything committed up to run.completed (a duplicate from
            # a killed coordinator included) is there, whatever the tails have caught up with so far.
            runs = await _read_to_end(kafka_bootstrap, [env.topics.runs])
            request_records = await _read_to_end(kafka_bootstrap, [env.topics.requests(a) for a in ACTIVITIES])

            def events() -> list[dict]:
                return [e for e in runs if e.get("run_id") == run_id]

            def requested() -> list[str]:
                return [v["request_id"] for v in request_records if v.get("run_id") == run_id]

            assert [(e["type"], e.get("redrives")) for e in events()] == [
                ("run.started", None), ("run.failed", None), ("run.redriven", 1), ("run.completed", 1)], events()
            [completed] = [e for e in events() if e["type"] == "run.completed"]
            assert completed["output"] == {"one": 1, "two": 2, "three": 1}, completed  # the handler of step one ran once
            asked = requested()
            assert asked.count(f"{run_id}/one/1") == 1, asked
            assert set(asked) == {f"{run_id}/one/1", f"{run_id}/two/flaky/flaky/1", f"{run_id}/two/slow/slow/1",
                                  f"{run_id}/two/flaky/flaky/2", slow_again, f"{run_id}/three/1"}, asked
            assert coordinator.starts == 3 and worker.alive(), env.logs()
        finally:
            await requests.stop()
