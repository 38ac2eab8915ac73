"""The coordinator loop in this process, on the real broker: one transaction per batch, and a record the state
machine raises on dead-lettered without losing the other records of its batch."""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from legato.streams.admin import ensure_topics
from legato.streams.config import Settings
from legato.streams.coordinator import Coordinator
from legato.topics import codec
from legato.topics.models import RunRequested
from legato.streams.definitions import deploy_files

pytestmark = pytest.mark.integration

INSTANT = """
name: instant
version: 1
steps:
  - id: done
    end: {output: "{'echo': input.n}"}
"""


async def _read_all(bootstrap: str, topic: str, want: int, timeout: float = 60.0) -> list[dict]:
    from legato.tools.harness import Tail  # reads committed records, as the contract asks

    tail = await Tail(bootstrap, [topic]).start()
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(tail.records) < want and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        return [orjson.loads(r.value) for r in tail.records]
    finally:
        await tail.stop()


async def test_a_record_the_machine_raises_on_is_dead_lettered_and_its_batch_still_commits(kafka_bootstrap: str, tmp_path: Path):
    (tmp_path / "wf").mkdir()
    (tmp_path / "wf" / "instant.yaml").write_text(INSTANT)
    settings = Settings(bootstrap=kafka_bootstrap, prefix=f"cb{uuid.uuid4().hex[:10]}", partitions=1,
                        workflow_dirs=[str(tmp_path / "wf")], data_dir=tmp_path / "data")
    await ensure_topics(kafka_bootstrap, settings.topics, [], 1, [], compacted=[settings.topics.changelog])
    await deploy_files(settings.workflow_dirs, kafka_bootstrap, settings.topics)
    coordinator = Coordinator(settings)
    decide = coordinator.machine.decide_events  # what the partition tasks call
    raised: list[str] = []

    def buggy(state, event, now, in_place=False):  # a state machine bug that only this run's trigger meets
        if getattr(event, "run_id", None) == "poison" and state is None:
            raised.append(event.run_id)
            raise ZeroDivisionError("a bug")
        return decide(state, event, now, in_place=in_place)

    coordinator.machine.decide_events = buggy  # type: ignore[method-assign]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    # all in one partition and produced before the coordinator starts: they arrive in one batch
    for run_id in ("before", "poison", "after"):
        await producer.send_and_wait(settings.topics.triggers, codec.dumps(RunRequested(workflow="instant", input={"n": run_id}, run_id=run_id)), key=run_id.encode())
    await producer.stop()
    serving = asyncio.create_task(coordinator.serve())
    try:
        events = await _read_all(kafka_bootstrap, settings.topics.runs, want=4)  # started + completed for two runs
        letters = await _read_all(kafka_bootstrap, settings.topics.dlq, want=1)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    completed = {e["run_id"]: e["output"] for e in events if e["type"] == "run.completed"}
    assert completed == {"before": {"echo": "before"}, "after": {"echo": "after"}}
    assert not [e for e in events if e["run_id"] == "poison"]
    assert len(letters) == 1, letters
    assert letters[0]["source_topic"] == settings.topics.triggers  # keyed by its run_id: decided where it landed
    assert letters[0]["reason"] == "internal error: ZeroDivisionError: a bug"
    assert orjson.loads(letters[0]["payload"])["run_id"] == "poison"
    assert raised == ["poison"]  # decided once; on the second reading it was dead-lettered without deciding
