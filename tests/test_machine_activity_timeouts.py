"""Given/when/then tables for an activity attempt's deadlines: ``start_timeout`` (request to the handler starting),
``run_timeout`` (handler start to completion), ``heartbeat`` (silence of a started handler) next to ``timeout``
(request to completion), and the ``activity.started`` / ``activity.heartbeat`` records that drive them."""
from __future__ import annotations

import pytest

from legato.topics.models import ActivityHeartbeat, ActivityStarted
from legato.workflows.keys import timed_out_request
from legato.workflows.machine import CancelRequest, replay
from legato.workflows.model import DefinitionError

from tests.machine_helpers import T0, Harness, compile_yaml, fired, ignored_in, machine_from, requests_in, timers_in


def flow(**keys: str) -> str:
    extra = "".join(f"    {k}: {v}\n" for k, v in keys.items())
    return f"""
name: t
steps:
  - id: a
    activity: work
{extra}"""


def started(h: Harness, now: int, attempt: int = 1) -> list:
    return h.deliver(ActivityStarted(request_id=f"r1/a/{attempt}", run_id="r1", step_id="a", attempt=attempt, started_ms=now), now)


def beat(h: Harness, now: int, attempt: int = 1) -> list:
    return h.deliver(ActivityHeartbeat(request_id=f"r1/a/{attempt}", run_id="r1", step_id="a", attempt=attempt, heartbeat_ms=now), now)


def cancels_in(commands: list) -> list[str]:
    return [c.cancel.request_id for c in commands if isinstance(c, CancelRequest)]


def reasons(commands: list) -> list[str]:
    return [c.reason for c in ignored_in(commands)]


# --- the definition and the request ------------------------------------------------------------------


def test_the_keys_parse_as_durations_and_refuse_zero():
    step = compile_yaml(flow(start_timeout="2m", run_timeout="1s", heartbeat="30s")).steps["a"]
    assert (step.start_timeout, step.run_timeout, step.heartbeat) == (120.0, 1.0, 30.0)
    for bad in ("0s", "soon"):
        with pytest.raises(DefinitionError):
            compile_yaml(flow(run_timeout=bad))


def test_a_request_asks_for_the_started_record_only_when_the_step_watches_the_start():
    h = Harness(machine_from(flow(run_timeout="1s", heartbeat="10s")))
    [req] = requests_in(h.start("t", now=T0))
    assert (req.report_started, req.heartbeat_ms) == (True, 10_000)
    plain = Harness(machine_from(flow(timeout="5s")))
    [req] = requests_in(plain.start("t", now=T0))
    assert (req.report_started, req.heartbeat_ms) == (None, None)


# --- start_timeout ------------------------------------------------------------------------------------


def test_start_timeout_is_armed_with_the_request_and_cleared_by_the_started_record():
    # given a step with a start_timeout; when it is requested
    h = Harness(machine_from(flow(start_timeout="2s", timeout="1m")))
    out = h.start("t", now=T0)
    # then its start timer runs beside the request-to-completion timeout
    assert {(t.timer_id, t.due_ms) for t in timers_in(out)} == {("a:timeout:1", T0 + 60_000), ("a:start_timeout:1", T0 + 2_000)}
    # when the handler starts, the start timer is gone and the step runs on
    started(h, T0 + 1_500)
    assert "a:start_timeout:1" not in h.state.timers and h.state.steps["a"].handler_started_ms == T0 + 1_500
    h.succeed("a", {"ok": True}, now=T0 + 30_000)
    assert h.status == "succeeded"


def test_a_handler_that_does_not_start_in_time_fails_the_attempt_with_a_start_timeout_and_retries():
    h = Harness(machine_from(flow(start_timeout="2s", timeout="1m", retry="{max_attempts: 2, backoff: 1s, jitter: false}")))
    h.start("t", now=T0)
    out = h.fire("a:start_timeout:1")
    # then the queued request is cancelled (its worker skips it), and the step waits for its retry
    assert cancels_in(out) == ["r1/a/1"]
    step = h.state.steps["a"]
    assert (step.status, step.error.type) == ("waiting_retry", "ActivityStartTimeout")
    assert not any(t.startswith("a:timeout:") for t in h.state.timers)
    h.fire("a:retry:1")
    assert h.pending_for("a").attempt == 2 and "a:start_timeout:2" in h.state.timers
    # when attempt 2 is not started either, the run fails with that error
    h.fire("a:start_timeout:2")
    assert h.status == "failed" and h.state.error.type == "ActivityStartTimeout" and h.state.steps["a"].status == "timed_out"


def test_without_a_started_record_a_start_timeout_fires_even_when_the_handler_runs():
    # a worker that sends no activity.started (independent workers need not) fails a start_timeout step unless its
    # completion comes within the start_timeout
    h = Harness(machine_from(flow(start_timeout="1s", timeout="1m")))
    h.start("t", now=T0)
    h.fire("a:start_timeout:1")
    assert h.status == "failed" and h.state.error.type == "ActivityStartTimeout"
    quick = Harness(machine_from(flow(start_timeout="1s", timeout="1m")))
    quick.start("t", now=T0)
    quick.succeed("a", 1, now=T0 + 500)
    assert quick.status == "succeeded" and not quick.state.timers.keys() - {"run:retention"}


# --- run_timeout --------------------------------------------------------------------------------------


def test_run_timeout_starts_when_the_handler_starts_so_queue_time_does_not_count():
    # given a step that allows 1 s of running and 1 min in all
    h = Harness(machine_from(flow(run_timeout="1s", timeout="1m")))
    out = h.start("t", now=T0)
    assert [t.timer_id for t in timers_in(out)] == ["a:timeout:1"]  # nothing to count until the handler starts
    # when its handler starts after 20 s in a worker's queue
    out = started(h, T0 + 20_000)
    # then its run timer counts from there
    assert [(t.timer_id, t.due_ms) for t in timers_in(out)] == [("a:run_timeout:1", T0 + 21_000)]
    # and a completion 900 ms later succeeds (and clears every deadline of the attempt)
    h.succeed("a", "done", now=T0 + 20_900)
    assert h.status == "succeeded"
    assert not any(":run_timeout:" in t or ":timeout:" in t for t in h.state.timers)


def test_a_handler_running_past_its_run_timeout_fails_the_attempt_and_is_cancelled():
    h = Harness(machine_from(flow(run_timeout="1s", timeout="1m")))
    h.start("t", now=T0)
    started(h, T0 + 5_000)
    out = h.fire("a:run_timeout:1")
    assert cancels_in(out) == ["r1/a/1"]
    assert h.status == "failed" and h.state.error.type == "ActivityRunTimeout"
    # the late completion changes nothing
    assert reasons(h.succeed(requests_in(h.commands)[0], "late", now=T0 + 7_000)) == ["run_finished"]


def test_without_a_started_record_run_timeout_never_starts_and_timeout_still_bounds_the_step():
    h = Harness(machine_from(flow(run_timeout="1s", timeout="10s")))
    h.start("t", now=T0)
    assert "a:run_timeout:1" not in h.state.timers
    h.fire("a:timeout:1")
    assert h.status == "failed" and h.state.error.type == "ActivityTimeout"


def test_the_request_timeout_still_fires_for_a_started_handler():
    h = Harness(machine_from(flow(run_timeout="1m", timeout="10s")))
    h.start("t", now=T0)
    started(h, T0 + 9_000)
    out = h.fire("a:timeout:1")
    assert h.state.error.type == "ActivityTimeout" and cancels_in(out) == []  # the worker stops at the request's deadline
    assert "a:run_timeout:1" not in h.state.timers


# --- heartbeat ----------------------------------------------------------------------------------------


def test_each_heartbeat_rearms_the_heartbeat_timer_under_a_new_id():
    h = Harness(machine_from(flow(heartbeat="30s", timeout="1h")))
    h.start("t", now=T0)
    assert not any(":heartbeat:" in t for t in h.state.timers)  # not before the handler starts
    started(h, T0 + 1_000)
    assert h.state.timers["a:heartbeat:1:0"].due_ms == T0 + 31_000
    out = beat(h, T0 + 20_000)
    assert [(t.timer_id, t.due_ms) for t in timers_in(out)] == [("a:heartbeat:1:1", T0 + 50_000)]
    assert "a:heartbeat:1:0" not in h.state.timers
    # a copy of the replaced timer fired before the heartbeat came is stale
    assert reasons(h.deliver(fired("r1", "a:heartbeat:1:0"), T0 + 31_000)) == ["stale_timer"]
    beat(h, T0 + 45_000)
    h.succeed("a", "ok", now=T0 + 60_000)
    assert h.status == "succeeded" and not any(":heartbeat:" in t for t in h.state.timers)


def test_a_silent_handler_fails_the_attempt_with_a_heartbeat_timeout():
    h = Harness(machine_from(flow(heartbeat="30s", timeout="1h", retry="{max_attempts: 2, backoff: 1s, jitter: false}")))
    h.start("t", now=T0)
    started(h, T0)
    beat(h, T0 + 10_000)
    out = h.fire("a:heartbeat:1:1")
    assert cancels_in(out) == ["r1/a/1"]
    step = h.state.steps["a"]
    assert (step.status, step.error.type) == ("waiting_retry", "ActivityHeartbeatTimeout")
    h.fire("a:retry:1")
    # the next attempt starts its count of heartbeats again
    assert (h.state.steps["a"].heartbeats, h.state.steps["a"].handler_started_ms) == (0, None)
    started(h, T0 + 50_000, attempt=2)
    assert "a:heartbeat:2:0" in h.state.timers


def test_a_heartbeat_before_any_started_record_counts_as_the_start():
    h = Harness(machine_from(flow(heartbeat="30s", run_timeout="5m", start_timeout="10s", timeout="1h")))
    h.start("t", now=T0)
    beat(h, T0 + 2_000)
    assert h.state.steps["a"].handler_started_ms == T0 + 2_000
    assert set(h.state.timers) == {"a:timeout:1", "a:run_timeout:1", "a:heartbeat:1:1"}


# --- refused records ----------------------------------------------------------------------------------


def test_duplicate_stale_and_unwatched_started_records_are_refused_and_counted():
    h = Harness(machine_from(flow(run_timeout="1s", timeout="1m", retry="{max_attempts: 2, backoff: 1s, jitter: false}")))
    h.start("t", now=T0)
    started(h, T0 + 100)
    before = h.state.model_dump()
    assert reasons(started(h, T0 + 200)) == ["duplicate_started"]
    assert h.state.model_dump() == before  # the run timer still counts from the first
    h.fire("a:run_timeout:1")
    assert reasons(started(h, T0 + 1_500)) == ["stale_started"]  # attempt 1 is over
    assert reasons(beat(h, T0 + 1_600)) == ["stale_heartbeat"]
    h.fire("a:retry:1")
    assert reasons(started(h, T0 + 3_000, attempt=3)) == ["stale_started"]  # never requested
    plain = Harness(machine_from(flow(timeout="1m")))
    plain.start("t", now=T0)
    assert reasons(started(plain, T0 + 10)) == ["unwatched_started"]
    assert reasons(beat(plain, T0 + 20)) == ["unwatched_heartbeat"]


def test_a_started_record_is_never_taken_for_a_completion():
    h = Harness(machine_from(flow(run_timeout="1s", timeout="1m")))
    h.start("t", now=T0)
    started(h, T0 + 10)
    assert h.status == "running" and h.state.steps["a"].status == "running" and h.state.requests == {"r1/a/1": "a"}


def test_replaying_the_log_gives_the_same_state():
    h = Harness(machine_from(flow(heartbeat="5s", run_timeout="1m", start_timeout="10s", timeout="1h", retry="{max_attempts: 2, backoff: 1s}")))
    h.start("t", now=T0)
    started(h, T0 + 1_000)
    beat(h, T0 + 3_000)
    h.fire("a:heartbeat:1:1")
    h.fire([t for t in h.state.timers if ":retry:" in t][0])
    beat(h, T0 + 20_000, attempt=2)
    h.succeed("a", "ok", now=T0 + 21_000)
    state, _ = replay(h.machine, h.log)
    assert state.model_dump() == h.state.model_dump()


def test_the_fence_maps_each_attempt_deadline_to_its_request():
    assert timed_out_request("r1", "a:timeout:2") == "r1/a/2"
    assert timed_out_request("r1", "p/b:start_timeout:1") == "r1/p/b/1"
    assert timed_out_request("r1", "a:run_timeout:3") == "r1/a/3"
    assert timed_out_request("r1", "a:heartbeat:2:7") == "r1/a/2"
    assert timed_out_request("r1", "a:retry:1") is None and timed_out_request("r1", "a:heartbeat:x:1") is None
    assert timed_out_request("r1", "run:timeout") is None
