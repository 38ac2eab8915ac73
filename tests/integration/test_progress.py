"""Progress chunks and signals, shell side, on the real broker: handlers stream partial results to
``<prefix>.progress``; ``legato signal`` and malformed signals on ``<prefix>.signals``."""
from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from legato.topics import codec
from legato.topics.codec import DecodeError
from legato.topics.models import ActivityCompleted, ProgressReported, RunEvent, SignalSent
from tests.integration.test_cli import cli

pytestmark = pytest.mark.integration


def new_run_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def of_run(records: list, run_id: str) -> list:
    """The records whose JSON value has this run_id (other tests put garbage on the shared topics)."""
    out = []
    for r in records:
        try:
            if codec.decode_object(r.value).get("run_id") == run_id:
                out.append(r)
        except DecodeError:
            continue
    return out


async def test_chunks_arrive_in_order_and_before_the_steps_completion(legato):
    run_id = new_run_id("stream")
    items = []

    async def collect() -> None:
        async for item in legato.client.stream(run_id, timeout=60):
            items.append(item)

    reading = asyncio.create_task(collect())
    await legato.client.trigger("sem_stream", {"chunks": 5, "interval": 0.05}, run_id=run_id)
    await asyncio.wait_for(reading, 90)
    chunks, terminal = items[:-1], items[-1]
    assert isinstance(terminal, RunEvent) and terminal.status == "succeeded" and terminal.output == {"chunks": 5}, terminal
    assert all(isinstance(c, ProgressReported) for c in chunks), chunks
    assert [c.seq for c in chunks] == [0, 1, 2, 3, 4] and [c.chunk for c in chunks] == [{"i": i} for i in range(5)]
    assert {(c.step_id, c.run_id) for c in chunks} == {("write", run_id)}
    # on the broker: every chunk was appended before the step's completion
    progress = of_run(await legato.read_topic(legato.topics.progress), run_id)
    completions = of_run(await legato.read_topic(legato.topics.completions), run_id)
    assert len(progress) == 5 and len(completions) == 1
    assert codec.decode(ActivityCompleted, completions[0].value).request_id == chunks[0].request_id
    assert max(r.timestamp for r in progress) <= completions[0].timestamp


async def test_a_client_subscribed_mid_run_gets_the_rest(legato):
    run_id = new_run_id("midrun")
    await legato.client.trigger("sem_stream", {"chunks": 12, "interval": 0.25}, run_id=run_id)

    async def first_chunk() -> bool:
        return bool(of_run(await legato.read_topic(legato.topics.progress), run_id))

    deadline = asyncio.get_running_loop().time() + 60
    while not await first_chunk():
        assert asyncio.get_running_loop().time() < deadline, "no chunk within 60 s"
        await asyncio.sleep(0.1)
    items = [item async for item in legato.client.stream(run_id, from_beginning=False, timeout=60)]
    chunks, terminal = items[:-1], items[-1]
    assert isinstance(terminal, RunEvent) and terminal.status == "succeeded", terminal
    seqs = [c.seq for c in chunks]
    assert seqs and seqs[0] > 0, seqs  # it missed the first ones: it came in mid-run
    assert seqs == list(range(seqs[0], 12)), seqs  # and got every later one, in order


async def test_trigger_wait_prints_the_chunks_live(legato):
    code, out, err = await cli("trigger", "sem_stream", "--input", '{"chunks": 3, "interval": 0.05}', "--wait", env=legato.env)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "step write #" in line]
    assert [line.split("step write ", 1)[1] for line in lines] == ['#0: {"i":0}', '#1: {"i":1}', '#2: {"i":2}'], err
    assert err.index('#2: {"i":2}') < err.index("run.completed"), err
    assert orjson.loads(out)["output"] == {"chunks": 3}


async def _dead_letters_from_signals(legato, marker: str, count: int = 1) -> list[dict]:
    def matching(records: list) -> list[dict]:
        letters = [codec.decode_object(r.value) for r in records]  # the coordinator writes only valid dead letters
        return [d for d in letters if d["source_topic"] == legato.topics.signals and marker in d["payload"]]

    return matching(await legato.read_topic(legato.topics.dlq, until=lambda rs: len(matching(rs)) >= count, timeout=60))


async def test_a_malformed_signal_is_dead_lettered_with_the_reason(legato):
    marker = uuid.uuid4().hex
    await legato.producer.send_and_wait(legato.topics.signals, orjson.dumps({"run_id": marker, "data": 1}), key=marker.encode())
    await legato.producer.send_and_wait(legato.topics.signals, b"{not json " + marker.encode(), key=marker.encode())
    letters = await _dead_letters_from_signals(legato, marker, count=2)
    assert len(letters) == 2, letters
    assert all(d["reason"].startswith("bad signal: ") for d in letters), letters
    assert any("signal" in d["reason"].split(":", 1)[1] for d in letters), letters  # the missing field is named
    legato.assert_alive()


async def test_legato_signal_produces_the_record(legato):
    run_id = new_run_id("cli-signal")
    code, out, err = await cli("signal", run_id, "review", "--data", '{"decision": "approve"}', "--id", "sig-1", env=legato.env)
    assert code == 0, err
    code, _, err = await cli("signal", run_id, "review", "--data", "{nope", env=legato.env)
    assert code == 2 and "--data is not valid JSON" in err

    def mine(records: list) -> list[tuple[int, bytes, SignalSent]]:
        out = []
        for r in records:
            try:
                s = codec.decode(SignalSent, r.value)
            except DecodeError:
                continue
            if s.run_id == run_id:
                out.append((r.partition, r.key, s))
        return out

    found = mine(await legato.read_topic(legato.topics.signals, until=lambda rs: bool(mine(rs)), timeout=30))
    assert len(found) == 1, found
    _, key, signal = found[0]
    assert key == run_id.encode()
    assert signal == SignalSent(run_id=run_id, signal="review", data={"decision": "approve"}, signal_id="sig-1")
