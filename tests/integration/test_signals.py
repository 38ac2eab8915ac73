"""Runs that wait for signals, on the real broker (issue 12 §1): a signal produced by kcat (any language can send
one) completes a waiting run; a signal that comes before its wait starts is kept and delivered; a signal for an
unknown run changes nothing.
"""
from __future__ import annotations

import json
import uuid

import orjson
import pytest

from legato.streams.kafka_io import partition_for
from legato.topics import codec
from legato.topics.codec import DecodeError

from tests.integration.test_independent_worker import kcat, kcat_run  # noqa: F401 (kcat is a fixture)

pytestmark = pytest.mark.integration


def new_run_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def values_of(records: list, run_id: str) -> list[dict]:
    """The JSON values with this run_id (other tests put garbage on the shared topics)."""
    out = []
    for r in records:
        try:
            value = codec.decode_object(r.value)
        except DecodeError:
            continue
        if value.get("run_id") == run_id:
            out.append(value)
    return out


async def started(legato, run_id: str) -> None:
    """Until the coordinator has started the run (a signal for a run it does not know yet is ignored)."""
    def seen(records: list) -> bool:
        return any(e.get("type") == "run.started" for e in values_of(records, run_id))

    await legato.read_topic(legato.topics.runs, until=seen, timeout=60)


async def waiting(legato, run_id: str, step_id: str) -> None:
    """Until the run's state in the coordinator's changelog has ``step_id`` waiting (for its signal)."""
    key = run_id.encode()

    def seen(records: list) -> bool:
        last = None
        for r in records:
            if r.key == key:
                last = r.value
        if last is None:
            return False
        steps = (orjson.loads(last) or {}).get("steps") or {}
        return any(isinstance(s, dict) and s.get("step_id") == step_id and s.get("status") == "waiting" for s in steps.values())

    await legato.read_topic(legato.topics.changelog, until=seen, timeout=60)


async def test_a_waiting_run_completes_on_a_signal_produced_by_kcat(legato, kcat):
    run_id = new_run_id("approve")
    await legato.client.trigger("sig_approval", {}, run_id=run_id)
    await waiting(legato, run_id, "approval")
    signal = {"run_id": run_id, "signal": "approval", "data": {"approved": True, "by": "kcat"}}
    # keyed by run_id, with librdkafka's default partitioner: the coordinator moves it to the run's partition
    await kcat_run(kcat, "-P", "-b", legato.bootstrap, "-t", legato.topics.signals, "-k", run_id, stdin=json.dumps(signal).encode() + b"\n")
    event = (await legato.wait_for({run_id}, timeout=60))[run_id]
    assert event.status == "succeeded", event
    assert event.output == {"approved": True, "by": "kcat"}
    await legato.assert_single_terminal(run_id)


async def test_a_signal_before_the_wait_starts_is_kept_and_delivered(legato):
    run_id = new_run_id("early")
    await legato.client.trigger("sig_late_wait", {}, run_id=run_id)
    await started(legato, run_id)  # its first step takes 3 s: the wait has not started
    await legato.client.signal(run_id, "approval", {"early": True}, signal_id="early-1")
    event = (await legato.wait_for({run_id}, timeout=60))[run_id]
    assert event.status == "succeeded", event
    assert event.output == {"early": True}


async def test_a_signal_for_an_unknown_run_changes_nothing(legato):
    run_id = new_run_id("nobody")
    partitions = len(await legato.producer.partitions_for(legato.topics.signals))
    probe = new_run_id("after")
    while partition_for(probe.encode(), partitions) != partition_for(run_id.encode(), partitions):
        probe = new_run_id("after")
    await legato.client.signal(run_id, "approval", {"x": 1})
    # A run on the same partition, signalled after it: the coordinator reads a partition's signals in order, so once
    # the probe has finished, the unknown run's signal was decided first and whatever it wrote is committed.
    await legato.client.trigger("sig_approval", {}, run_id=probe)
    await started(legato, probe)
    await legato.client.signal(probe, "approval", "go")
    assert (await legato.wait_for({probe}, timeout=60))[probe].status == "succeeded"
    assert not values_of(await legato.read_topic(legato.topics.runs), run_id)
    letters = [codec.decode_object(r.value) for r in await legato.read_topic(legato.topics.dlq)]
    assert not [d for d in letters if run_id in d["payload"]]
    legato.assert_alive()
