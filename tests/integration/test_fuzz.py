"""Bad input at CI size: 1,000 hypothesis-generated bad messages on triggers and completions, interleaved with
50 valid runs, against real coordinator and worker processes. `legato chaos fuzz` runs 10,000 + 500.

Where each kind goes:
- not a JSON object of the right shape (random bytes, non-JSON, wrong types, missing fields, nesting deeper than
  the JSON parser's limit, an empty value, a non-UTF-8 key with a bad value) → `<prefix>.dlq` with a reason
- a well-formed trigger for an unknown workflow → a `run.failed` event (UnknownWorkflow)
- a well-formed completion for an unknown run, an unknown request or a stale attempt → ignored and counted
  (`legato_events_ignored_total{reason=unknown_run|unknown_request|stale_attempt|run_finished}`)
- a value over the size limit → refused by the broker at produce time (the broker's limit is the codec's)
"""
from __future__ import annotations

import pytest

import asyncio

from legato.tools.chaos_fuzz import blowups, generate_bad, scenario_fuzz
from legato.tools.harness import Env, RunWatch, Tail, producer, wait_ready

pytestmark = pytest.mark.integration


def test_generator_covers_every_category():
    msgs = generate_bad(400, ["fz-1", "fz-2"], seed=3)
    cats = {(m.topic, m.category) for m in msgs}
    assert len(cats) >= 15, sorted(cats)
    assert all(m.expect in ("dlq", "ignored", "failed_run") for m in msgs)
    assert any(m.key and m.key.startswith(b"\xff") for m in msgs)  # non-UTF-8 keys


async def test_fuzz_bad_messages_with_valid_runs(kafka_bootstrap, tmp_path):
    r = await scenario_fuzz(kafka_bootstrap, bad=1000, valid=50, seed=11, timeout=150, workdir=tmp_path, with_blowups=False)
    # nothing crashed: both processes are the ones started, still alive
    assert r["processes_alive"] and r["coordinator_restarts"] == 0, r
    # every valid run completed with the right output
    assert r["all_finished"] and r["lost"] == 0 and r["wrong_output"] == 0 and r["succeeded"] == 50, r
    # every malformed message is in the DLQ, each with a reason
    assert r["dlq_records"] == r["expected_dlq"], r
    assert r["dlq_without_reason"] == 0, r
    # well-formed triggers for unknown workflows end as run.failed (UnknownWorkflow)
    assert r["unknown_workflow_runs_failed"] == r["expected_unknown_workflow_runs"], r
    # well-formed completions about unknown runs/requests or stale attempts are ignored and counted
    assert r["ignored_counted"] >= r["expected_ignored"], r
    # over-size payloads never reach Legato: the broker refuses them
    assert r["refused_at_produce"] == {"MessageSizeTooLargeError": 2}, r
    # misbehaving handlers fail only their own run, with a clear error
    hr = r["handler_runs"]
    assert hr["chaos_raise"][0] == "failed" and hr["chaos_raise"][1] == "RuntimeError", hr
    assert hr["chaos_hang"][0] == "failed" and hr["chaos_hang"][1] == "ActivityTimeout", hr
    assert hr["chaos_unserializable"][0] == "failed" and hr["chaos_unserializable"][1] == "OutputNotSerializable", hr


async def test_dead_letter_of_a_message_near_the_limit(kafka_bootstrap, tmp_path):
    env = Env(kafka_bootstrap, tmp_path)
    await env.create_topics()
    coord, worker = env.process("coordinator"), env.process("worker")
    tail = await Tail(kafka_bootstrap, [env.topics.runs]).start()
    dlq = await Tail(kafka_bootstrap, [env.topics.dlq]).start()
    prod = await producer(kafka_bootstrap)
    try:
        await wait_ready(env, prod, RunWatch(tail), [coord, worker])
        for bad in blowups():
            topic = env.topics.triggers if bad.topic == "triggers" else env.topics.completions
            await prod.send_and_wait(topic, bad.value, key=bad.key)
        for _ in range(150):
            if len(dlq.records) >= 2:
                break
            await asyncio.sleep(0.2)
        assert len(dlq.records) == 2, f"{len(dlq.records)} of 2 near-limit messages dead-lettered"
        assert "Crashed" not in (tmp_path / "coordinator.log").read_text(errors="replace")
    finally:
        await prod.stop()
        await tail.stop()
        await dlq.stop()
        env.stop_all()
