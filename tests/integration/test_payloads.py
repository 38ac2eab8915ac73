"""Claim checks on the development broker (issue 27): values past a Kafka record travel by reference; expressions
see the values, runs keep references; a coordinator SIGKILLed in the middle loses nothing."""
from __future__ import annotations

import asyncio
import hashlib
import signal
import time

import orjson
import pytest

from legato.topics.models import ActivityCompleted
from legato.topics.payloads import KafkaPayloadStore, PayloadError, PayloadRef, Payloads, is_ref, refs_in

from .conftest import _start

pytestmark = pytest.mark.asyncio(loop_scope="session")

PARTS = 50
BIG = 20_000_000
PART = 2_000_000


async def test_the_kafka_store_keeps_20_mb_in_chunks_and_deletes_them(legato):
    payloads = Payloads(KafkaPayloadStore(legato.bootstrap, legato.topics.payloads))
    value = "é" * 10_000_000
    try:
        ref = await payloads.put("store-test", value)
        parsed = PayloadRef.model_validate(ref)
        data = orjson.dumps(value)
        assert parsed.size == len(data) and parsed.sha256 == hashlib.sha256(data).hexdigest()
        assert parsed.chunks == -(-len(data) // 900_000) and parsed.partition is not None
        assert await payloads.fetch(ref) == value
        records = await legato.read_topic(legato.topics.payloads)
        mine = [r for r in records if r.key.startswith(parsed.id.encode())]
        assert len(mine) == parsed.chunks and max(len(r.value) for r in mine) <= 900_000
        assert {r.partition for r in mine} == {parsed.partition}
        await payloads.delete(ref)
        with pytest.raises(PayloadError, match="chunks found"):
            await payloads.fetch(ref)
    finally:
        await payloads.stop()


async def _completions(legato, run_id: str, step_id: str) -> list[ActivityCompleted]:
    return [c for c in await legato.records_of(legato.topics.completions, ActivityCompleted, run_id) if c.step_id == step_id]


async def test_20_mb_then_50_branches_of_2_mb_joined_and_passed_on_across_a_coordinator_sigkill(legato):
    """The issue's workflow: a condition and the output read the 20 MB value, the map's items come from the input,
    its 50 outputs of 2 MB are joined and passed on to a step whose worker resolves 120 MB; the coordinator is
    SIGKILLed while the branches run and another takes over."""
    started = time.monotonic()
    run_id = await legato.trigger("e2e_payloads", {"big": BIG, "part": PART, "parts": list(range(PARTS))})
    deadline = time.monotonic() + 120
    while len(await _completions(legato, run_id, "part")) < 10:  # some branches done, most not
        assert time.monotonic() < deadline, f"the branches did not start within 120 s\n{legato.logs()}"
        await asyncio.sleep(0.5)
    coordinator = next(s for s in legato.services if s.name.startswith("coordinator"))
    coordinator.proc.send_signal(signal.SIGKILL)
    coordinator.proc.wait(10)
    legato.services.remove(coordinator)
    legato.services.append(_start("coordinator-after-kill", ["coordinator"], legato.env, legato.workdir))

    [event] = (await legato.wait_for({run_id}, timeout=240)).values()
    elapsed = time.monotonic() - started
    assert event.status == "succeeded", event
    measured = event.output["measured"]
    assert event.output["big_chars"] == BIG and event.output["parts"] == PARTS and event.output["last_is_x"] is True, event.output
    assert measured["big"] == {"chars": BIG, "first": "x"}, measured["big"]
    assert measured["parts"] == [{"chars": PART, "first": chr(65 + i % 26)} for i in range(PARTS)]
    assert measured["last"] == {"chars": PART, "first": "X"}
    assert len(orjson.dumps(event.output)) < 10_000  # the run's output and its stored document held references only
    await legato.assert_single_terminal(run_id)
    # nothing lost, nothing run twice that succeeded: one successful completion per branch
    parts = [c for c in await _completions(legato, run_id, "part") if c.status == "succeeded"]
    assert len({c.request_id for c in parts}) == len(parts) == PARTS, sorted(c.request_id for c in parts)
    assert all(is_ref(c.output["text"]) for c in parts)
    print(f"\ne2e_payloads: 20 MB + {PARTS} x 2 MB, coordinator SIGKILLed mid-map: succeeded in {elapsed:.1f} s")
    legato.assert_alive()


async def test_a_large_trigger_input_and_large_signal_data_travel_by_reference(legato):
    doc = "d" * 1_000_000
    run_id = await legato.trigger("e2e_payload_io", {"doc": doc})
    records = await legato.read_topic(legato.topics.triggers, until=lambda rs: any(run_id.encode() in (r.value or b"") for r in rs))
    [trigger] = [orjson.loads(r.value) for r in records if run_id.encode() in (r.value or b"")]
    assert is_ref(trigger["input"]["doc"]) and len(orjson.dumps(trigger)) < 2000, "the trigger carries a reference"
    deadline = time.monotonic() + 60
    while not await _completions(legato, run_id, "first"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.3)
    await legato.client.signal(run_id, "approval", {"note": "n" * 600_000, "who": "ada"})
    [event] = (await legato.wait_for({run_id}, timeout=60)).values()
    assert event.status == "succeeded", event
    assert event.output == {"input_chars": 1_000_000, "first": {"doc": {"chars": 1_000_000, "first": "d"}}, "signal_chars": 600_000,
                            "after": {"note": {"chars": 600_000, "first": "n"}}, "who": "ada"}, event.output
    signals = await legato.read_topic(legato.topics.signals, until=lambda rs: any(run_id.encode() == r.key for r in rs))
    [sent] = [orjson.loads(r.value) for r in signals if r.key == run_id.encode()]
    assert is_ref(sent["data"]["note"]) and sent["data"]["who"] == "ada"
    assert [r.id for r in refs_in(sent)] and len(orjson.dumps(sent)) < 2000


async def _payload_records(legato, ref: dict) -> list:
    """The records of the payloads topic from a reference's first chunk on, on its partition only (the topic holds
    the other tests' 120 MB)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tp = TopicPartition(legato.topics.payloads, ref["partition"])
    consumer = AIOKafkaConsumer(bootstrap_servers=legato.bootstrap, enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.seek(tp, ref["offset"])
        records = []
        while await consumer.position(tp) < end:
            for batch in (await consumer.getmany(tp, timeout_ms=1000)).values():
                records += batch
        return records
    finally:
        await consumer.stop()


async def _live_bytes(legato, run_id: str, ref: dict) -> tuple[int, int]:
    """Of the payload records keyed ``<run_id>/…``: the bytes of the latest value per key (what compaction keeps;
    a tombstone keeps none), and the bytes of every record still in the log."""
    latest: dict[bytes, int] = {}
    on_log = 0
    for r in await _payload_records(legato, ref):
        if r.key is not None and r.key.startswith(f"{run_id}/".encode()):
            latest[r.key] = len(r.value or b"")
            on_log += len(r.value or b"")
    return sum(latest.values()), on_log


async def test_a_runs_retention_deletes_its_payloads(legato):
    """Forgetting a run writes a tombstone for every chunk of its payloads, in the transaction that forgets it: what
    compaction keeps of them is 0 bytes (the log cleaner removes the chunks once their segment rolls, within
    ``segment.ms``, 1 h on Legato's compacted topics, plus the cleaner's pass)."""
    event = await legato.run("e2e_payload_retention", {"bytes": 3_000_000}, timeout=60)
    assert event.status == "succeeded" and is_ref(event.output["text"]), event
    run_id, ref = event.run_id, event.output["text"]
    live, on_log = await _live_bytes(legato, run_id, ref)
    assert live == on_log == 3_000_002, (live, on_log)
    started = time.monotonic()
    while (await _live_bytes(legato, run_id, ref))[0] > 0:  # forgotten 2 s after it ended: the tombstones come with it
        assert time.monotonic() - started < 60, f"the payload is still live 60 s after the run ended\n{legato.logs()}"
        await asyncio.sleep(1)
    records = await _payload_records(legato, ref)
    tombstones = [r for r in records if r.key is not None and r.key.startswith(f"{run_id}/".encode()) and r.value is None]
    assert len(tombstones) == event.output["text"]["chunks"], tombstones
    print(f"\nretention: {on_log:,} payload bytes of the run live before its retention, 0 after "
          f"({len(tombstones)} tombstones, {time.monotonic() - started:.1f} s after the run ended)")


async def _live_of(legato, ref: dict) -> int:
    """Bytes of the latest value of each chunk of ``ref`` (what compaction keeps of it; a tombstone keeps none)."""
    pid = PayloadRef.model_validate(ref).id
    latest = {r.key: len(r.value or b"") for r in await _payload_records(legato, ref) if r.key is not None and r.key.startswith(pid.encode())}
    return sum(latest.values())


async def test_a_fork_owns_a_copy_of_the_payloads_it_starts_with(legato):
    """A fork starts with the outputs of the steps before its fork point; those stored by reference are copied under
    the new run's id, so the source's retention (which deletes what the source owns) leaves the fork's intact, and
    the fork's own retention deletes its copies."""
    source = await legato.run("e2e_fork_payload", {"bytes": 2_000_000}, timeout=60)
    assert source.status == "succeeded" and is_ref(source.output["text"]), source
    fork = await legato.client.forked(source.run_id, "after", new_run_id=f"{source.run_id}-fork", timeout=60)
    assert fork.status == "succeeded" and is_ref(fork.output["text"]), fork
    theirs, ours = source.output["text"], fork.output["text"]
    assert PayloadRef.model_validate(ours).id.startswith(f"{fork.run_id}/"), ours  # the fork's own copy
    assert ours["sha256"] == theirs["sha256"] and ours["size"] == theirs["size"] == 2_000_002
    started = time.monotonic()
    while await _live_of(legato, theirs) > 0:  # the source is forgotten 3 s after it ended: its payload goes
        assert time.monotonic() - started < 60, f"the source's payload is still live 60 s after it ended\n{legato.logs()}"
        await asyncio.sleep(0.5)
    assert await _live_of(legato, ours) == 2_000_002, "the source's retention deleted the fork's payload"
    while await _live_of(legato, ours) > 0:  # and the fork's retention deletes its copy: nothing left behind
        assert time.monotonic() - started < 60, f"the fork's payload is still live 60 s after it ended\n{legato.logs()}"
        await asyncio.sleep(0.5)


async def test_a_late_duplicates_payload_is_deleted_with_the_run(legato):
    """A completion the run ignores (here a duplicate with another output, as a retried LLM call gives) brought a
    payload the worker stored under the run's id, which nothing refers to: the run lists it and its retention
    tombstones it with the rest."""
    from legato.topics import codec

    run_id = await legato.client.trigger("e2e_fork_payload", {"bytes": 1_000_000})
    started = time.monotonic()
    while not (done := await _completions(legato, run_id, "big")):
        assert time.monotonic() - started < 60, f"step big did not complete\n{legato.logs()}"
        await asyncio.sleep(0.5)
    payloads = Payloads(KafkaPayloadStore(legato.bootstrap, legato.topics.payloads))
    try:
        late = await payloads.put(run_id, "y" * 1_500_000)  # what a second execution of the step stored
    finally:
        await payloads.stop()
    duplicate = done[0].model_copy(update={"output": {"text": late}})
    await legato.produce(legato.topics.completions, codec.dumps(duplicate), run_id.encode())
    event = (await legato.wait_for({run_id}, timeout=60))[run_id]
    assert event.status == "succeeded" and event.output["text"]["sha256"] != late["sha256"], event  # the duplicate was ignored
    assert await _live_of(legato, late) == 1_500_002
    while await _live_of(legato, late) > 0:  # the run is forgotten 3 s after it ended, and the late payload with it
        assert time.monotonic() - started < 90, f"the ignored completion's payload outlived the run\n{legato.logs()}"
        await asyncio.sleep(0.5)


async def test_a_completion_for_a_forgotten_runs_payload_is_deleted_at_once(legato):
    """A completion for a run the coordinator no longer knows (its retention is over: a very late LLM answer) whose
    output the worker stored under that run's id: no run will ever list it, so the coordinator tombstones it when it
    ignores the completion."""
    import uuid

    from legato.topics import codec

    run_id = f"forgotten-{uuid.uuid4().hex[:8]}"
    payloads = Payloads(KafkaPayloadStore(legato.bootstrap, legato.topics.payloads))
    try:
        late = await payloads.put(run_id, "z" * 1_200_000)
    finally:
        await payloads.stop()
    assert await _live_of(legato, late) == 1_200_002
    completion = ActivityCompleted(request_id=f"{run_id}/big/1", run_id=run_id, step_id="big", attempt=1, status="succeeded",
                                   output={"text": late})
    await legato.produce(legato.topics.completions, codec.dumps(completion), run_id.encode())
    started = time.monotonic()
    while await _live_of(legato, late) > 0:
        assert time.monotonic() - started < 60, f"the payload of a completion for an unknown run was kept\n{legato.logs()}"
        await asyncio.sleep(0.5)


async def test_progress_chunks_stored_by_reference_are_deleted_with_the_run(legato):
    """Progress chunks over the inline limit are stored by reference under the run's id and sent on
    ``legato.progress``, which the coordinator never reads: the completion lists them (``progress_payloads``) and
    the run's retention tombstones them with the rest."""
    from legato.topics.models import ProgressReported

    event = await legato.run("e2e_progress_payload", {"chunks": 2, "chunk_bytes": 400_000, "interval": 0.0}, timeout=60)
    assert event.status == "succeeded", event
    started = time.monotonic()
    chunks = [p.chunk for p in await legato.records_of(legato.topics.progress, ProgressReported, event.run_id)]
    stored = refs_in(chunks)
    assert len(stored) == 2 and all(r.id.startswith(event.run_id + "/") for r in stored), chunks
    refs = [r.wire() for r in stored]
    while sum([await _live_of(legato, ref) for ref in refs]) > 0:  # forgotten 3 s after it ended, its progress with it
        assert time.monotonic() - started < 60, f"the progress chunks stored by reference outlived the run\n{legato.logs()}"
        await asyncio.sleep(0.5)


async def test_the_file_store_end_to_end(legato, tmp_path):
    """A coordinator and a worker of their own (a fresh topic prefix) with ``LEGATO_PAYLOAD_STORE=file://``: large
    outputs are files, expressions read them, the next step receives them, nothing lands on the payloads topic."""
    import uuid

    from legato.topics.client import LegatoClient
    from legato.topics.payloads import FilePayloadStore

    from .conftest import Legato, _wait_ready

    store = tmp_path / "payloads"
    prefix = f"fs{uuid.uuid4().hex[:10]}"
    env = {**legato.env, "LEGATO_TOPIC_PREFIX": prefix, "LEGATO_PAYLOAD_STORE": f"file://{store}"}
    own = Legato(legato.bootstrap, prefix, env, tmp_path)
    own.services += [_start("fs-coordinator", ["coordinator"], env, tmp_path), _start("fs-worker", ["worker"], env, tmp_path)]
    own.client = LegatoClient(legato.bootstrap, prefix, payload_store=FilePayloadStore(store))
    await own.client.__aenter__()
    try:
        await _wait_ready(own)
        parts = 5
        event = await own.run("e2e_payloads", {"big": 2_000_000, "part": 400_000, "parts": list(range(parts))}, timeout=120)
        assert event.status == "succeeded", f"{event}\n{own.logs()}"
        assert event.output["big_chars"] == 2_000_000 and event.output["parts"] == parts and event.output["last_is_x"] is False
        assert event.output["measured"]["parts"] == [{"chars": 400_000, "first": chr(65 + i)} for i in range(parts)]
        files = FilePayloadStore(store).ids()
        assert len(files) == 1 + parts and all(f.startswith(f"{event.run_id}/") for f in files), files
        completions = [c.model_dump(mode="json") for c in await own.records_of(own.topics.completions, ActivityCompleted, event.run_id)]
        sent = refs_in(completions)
        assert len(sent) == 1 + parts and all(r.partition is None and r.chunks is None for r in sent), sent  # file references
        assert event.output["measured"]["big"] == {"chars": 2_000_000, "first": "x"}
    finally:
        await own.client.__aexit__(None, None, None)
        for service in own.services:
            service.stop()
