"""The topic contract end to end: idempotent triggers, unknown workflows, dead letters, assigned run ids,
completion topics."""
from __future__ import annotations

import asyncio
import base64
import uuid

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from legato.topics import codec
from legato.topics.client import TERMINAL_TYPES
from legato.topics.models import ActivityRequested, DeadLetter, RunEvent

pytestmark = pytest.mark.integration

PARTITIONS = 8  # LEGATO_PARTITIONS is not set: the default


def partition_of(key: str) -> int:
    everything = list(range(PARTITIONS))
    return DefaultPartitioner()(key.encode(), everything, everything)


def same_partition_id(run_id: str, tag: str) -> str:
    """A fresh run id whose records land on the same partition as ``run_id``'s (on every run-keyed topic)."""
    target = partition_of(run_id)
    while True:
        candidate = f"{tag}-{uuid.uuid4()}"
        if partition_of(candidate) == target:
            return candidate


async def test_duplicate_trigger_starts_nothing(legato):
    run_id = f"dup-{uuid.uuid4()}"
    await legato.trigger("e2e_noop", {"n": 1}, run_id=run_id)
    await legato.trigger("e2e_noop", {"n": 2}, run_id=run_id)  # same run_id, other input: a duplicate
    first = (await legato.wait_for({run_id}))[run_id]
    assert first.status == "succeeded", first
    assert first.output == {"n": 1}, "the duplicate trigger changed the run"
    await legato.trigger("e2e_noop", {"n": 3}, run_id=run_id)  # after the run finished
    # A sentinel run on the same partition, triggered after the duplicates: once it has finished, the
    # coordinator has consumed both duplicates (one partition is processed in order), so nothing more can come.
    sentinel = same_partition_id(run_id, "sentinel")
    done = await legato.run("e2e_noop", {"sentinel": True}, run_id=sentinel)
    assert done.status == "succeeded"
    events = await legato.run_events(run_id)
    assert [e.type for e in events].count("run.started") == 1, events
    terminal = [e for e in events if e.type in TERMINAL_TYPES]
    assert len(terminal) == 1, terminal
    assert terminal[0].output == {"n": 1}


async def test_unknown_workflow_fails_the_run(legato):
    event = await legato.run("no_such_workflow_e2e", {"x": 1})
    assert event.type == "run.failed", event
    assert event.status == "failed"
    assert event.workflow == "no_such_workflow_e2e"
    assert event.error is not None and event.error.type == "UnknownWorkflow"
    assert event.error.retryable is False
    assert "no_such_workflow_e2e" in event.error.message
    await legato.assert_single_terminal(event.run_id)


async def test_bad_records_are_dead_lettered_and_runs_go_on(legato):
    marker = uuid.uuid4().hex
    t = legato.topics
    bad = {
        # name: (topic, key, raw value, expected reason prefix, text of the expected reason)
        "trigger_not_json": (t.triggers, None, f'{{"workflow": "e2e_noop", broken {marker}'.encode(), "bad trigger:", "not valid JSON"),
        "trigger_wrong_types": (t.triggers, f"k-{marker}".encode(), orjson.dumps({"workflow": 42, "input": "not a dict", "marker": marker}), "bad trigger:", "invalid RunRequested"),
        "trigger_array": (t.triggers, None, orjson.dumps(["e2e_noop", marker]), "bad trigger:", "expected a JSON object"),
        "completion_not_json": (t.completions, f"run-{marker}".encode(), f"not json at all {marker}".encode(), "bad completion:", "not valid JSON"),
        "completion_wrong_types": (
            t.completions,
            None,
            orjson.dumps({"request_id": 1, "run_id": ["x"], "step_id": "s", "attempt": 0, "status": "maybe", "marker": marker}),
            "bad completion:",
            "invalid ActivityCompleted",
        ),
        "completion_not_utf8": (t.completions, None, b"\xff\xfe\x00" + marker.encode(), "bad completion:", "not valid JSON"),
    }
    for topic, key, value, _, _ in bad.values():
        await legato.produce(topic, value, key=key)

    def letters(records):
        out = {}
        for r in records:
            try:
                letter = codec.decode(DeadLetter, r.value)
            except codec.DecodeError:
                continue
            payload = letter.payload
            if payload.startswith("base64:"):
                payload = base64.b64decode(payload[len("base64:"):]).decode("utf-8", errors="replace")
            if marker in payload:
                out[letter.payload] = (letter, r.key)
        return out

    records = await legato.read_topic(t.dlq, until=lambda rs: len(letters(rs)) >= len(bad), timeout=30)
    found = letters(records)
    for name, (topic, key, value, prefix, text) in bad.items():
        payload = codec.payload_text(value)
        assert payload in found, f"{name}: no dead letter with the original payload; got {list(found)}"
        letter, dlq_key = found[payload]
        assert letter.source_topic == topic, name
        assert letter.reason.startswith(prefix), (name, letter.reason)
        assert text in letter.reason, (name, letter.reason)
        assert letter.offset >= 0 and 0 <= letter.partition < PARTITIONS
        assert letter.key == (key.decode() if key is not None else None), name
        assert dlq_key == key, f"{name}: the dead letter keeps the original key"
    assert len(found) == len(bad), "a bad record was dead-lettered twice"

    event = await legato.run("e2e_sequential", {"start": 0})
    assert event.status == "succeeded", event
    assert event.output == {"first": 1, "second": 11, "third": 111}


async def test_bad_activity_request_is_dead_lettered_by_the_worker(legato):
    marker = uuid.uuid4().hex
    topic = legato.topics.requests("e2e_echo")
    await legato.produce(topic, f"garbage {marker}".encode(), key=b"whatever")
    wrong = orjson.dumps({"request_id": f"r-{marker}", "run_id": f"run-{marker}", "step_id": "s", "activity": "e2e_add", "attempt": 1, "input": {}})
    await legato.produce(topic, wrong, key=f"run-{marker}".encode())

    def mine(records):
        return [codec.decode(DeadLetter, r.value) for r in records if marker.encode() in r.value]

    records = await legato.read_topic(legato.topics.dlq, until=lambda rs: len(mine(rs)) >= 2, timeout=30)
    reasons = sorted(letter.reason for letter in mine(records))
    assert reasons[0].startswith("bad activity request: not valid JSON"), reasons
    assert "request for activity 'e2e_add' on the topic of 'e2e_echo'" in reasons[1], reasons
    event = await legato.run("e2e_noop", {"after": marker})
    assert event.status == "succeeded"


async def test_trigger_without_run_id_or_key_gets_one(legato):
    correlation = f"corr-{uuid.uuid4()}"
    value = orjson.dumps({"workflow": "e2e_noop", "input": {"anonymous": True}, "correlation_id": correlation})
    await legato.produce(legato.topics.triggers, value, key=None)

    def completed(records):
        for r in records:
            try:
                event = codec.decode(RunEvent, r.value)
            except codec.DecodeError:
                continue
            if event.correlation_id == correlation and event.type == "run.completed" and event.workflow == "e2e_noop":
                return event
        return None

    records = await legato.read_topic(legato.topics.runs, until=lambda rs: completed(rs) is not None, timeout=60)
    event = completed(records)
    assert event.status == "succeeded"
    assert event.output == {"anonymous": True}
    uuid.UUID(event.run_id)  # an assigned run id is a uuid
    events = await legato.assert_single_terminal(event.run_id)
    assert all(e.correlation_id == correlation for e in events)


async def test_completion_topic_gets_the_terminal_event(legato):
    topic = f"{legato.prefix}.e2e-done"
    event = await legato.run("e2e_completion", {"value": "hello"})
    assert event.status == "succeeded", event
    assert event.output == {"echoed": "hello"}

    def mine(records):
        return [codec.decode(RunEvent, r.value) for r in records if event.run_id.encode() in r.value]

    records = await legato.read_topic(topic, until=lambda rs: len(mine(rs)) >= 1, timeout=30)
    on_topic = mine(records)
    assert len(on_topic) == 1, on_topic
    assert on_topic[0] == event, "the completion topic carries the same terminal event as the runs topic"
    assert [r.key for r in records if event.run_id.encode() in r.value] == [event.run_id.encode()]
    await legato.assert_single_terminal(event.run_id)


async def test_workers_never_execute_a_request_from_an_aborted_transaction(legato):
    """The coordinator writes requests in transactions; one aborted by a crash is repeated, committed, by the next
    owner of the partition. Workers read committed records only, so the aborted copy never runs."""
    from aiokafka import AIOKafkaProducer

    run_id = f"txn-{uuid.uuid4()}"
    topic = legato.topics.requests("e2e_echo")

    def request(tag: str) -> bytes:
        return codec.dumps(ActivityRequested(request_id=f"{run_id}/{tag}/1", run_id=run_id, step_id=tag, activity="e2e_echo",
                                             attempt=1, input={"tag": tag}))

    producer = AIOKafkaProducer(bootstrap_servers=legato.bootstrap, transactional_id=f"test-{run_id}")
    await producer.start()
    try:
        for tag, commit in (("aborted", False), ("committed", True), ("probe", True)):
            await producer.begin_transaction()
            await producer.send_and_wait(topic, request(tag), key=run_id.encode())
            await (producer.commit_transaction() if commit else producer.abort_transaction())
    finally:
        await producer.stop()

    def answered(records: list) -> bool:
        return any(orjson.loads(r.value).get("request_id") == f"{run_id}/probe/1" for r in records if r.key == run_id.encode())

    # The three share a partition, which a worker reads in offset order: once the probe (last) is answered, the
    # aborted request (first) was skipped or would have been answered before it (e2e_echo answers at once).
    await legato.read_topic(legato.topics.completions, until=answered, timeout=30)
    records = await legato.read_topic(legato.topics.completions)
    ours = [orjson.loads(r.value)["request_id"] for r in records if r.key == run_id.encode()]
    assert sorted(ours) == [f"{run_id}/committed/1", f"{run_id}/probe/1"]


