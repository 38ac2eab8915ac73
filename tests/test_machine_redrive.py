"""Given/when/then tables for redrive: a failed run resumes at the top-level step it failed at; steps that succeeded
keep their outputs (docs/concepts/runs.md). Inside compound steps: test_machine_redrive_compound.py."""
from __future__ import annotations

import pytest

from legato.topics.models import ActivityRequested, ChildRunFinished, RunCancelRequested, RunRedriveRequested
from legato.workflows.machine import StartChildRun
from tests.machine_helpers import T0, Harness, ignored_in, machine_from, requests_in, fired, run_events_in, succeeded, terminal_events_in

THREE = """
name: three
timeout: 1m
steps:
  - id: one
    activity: w
  - id: two
    activity: w
    retry: {max_attempts: 2}
  - id: three
    activity: w
output: "{'one': steps.one.output, 'three': steps.three.output}"
"""

PARENT = """
name: parent
steps:
  - id: sub
    workflow: child
"""

CHILD = """
name: child
steps:
  - id: x
    activity: w
"""

FAILING = """
name: failing
steps:
  - id: stop
    fail: {reason: "'refused'"}
"""


def redrive(h: Harness, now: int | None = None):
    return h.deliver(RunRedriveRequested(run_id=h.run_id, reason="fixed"), now)


def failed_at_two() -> Harness:
    h = Harness(machine_from(THREE))
    h.start("three", now=T0)
    h.succeed("one", "first", now=T0 + 10)
    h.fail("two", "Bad", retryable=False, now=T0 + 20)
    assert h.status == "failed"
    return h


def test_a_failed_run_resumes_at_its_failed_step_with_the_next_attempt():
    h = failed_at_two()
    out = redrive(h, now=T0 + 1_000)
    [redriven] = run_events_in(out)
    assert (redriven.event.type, redriven.event.status, redriven.event.redrives) == ("run.redriven", "running", 1)
    [request] = requests_in(out)
    assert (request.step_id, request.attempt, request.request_id) == ("two", 2, "r1/two/2")
    assert h.status == "running" and h.state.error is None and h.state.finished_ms is None
    # the run's timeout restarts (a new id: a copy of an old run:timeout fired twice is stale); no retention
    assert set(h.state.timers) == {"run:timeout~1", "two:timeout:2"}
    assert h.state.timers["run:timeout~1"].due_ms == T0 + 1_000 + 60_000


def test_steps_that_succeeded_are_not_run_again_and_the_run_ends_with_their_outputs():
    h = failed_at_two()
    redrive(h)
    h.succeed("two", "second")
    h.succeed("three", "third")
    assert [r.step_id for r in requests_in(h.commands)] == ["one", "two", "two", "three"]
    [failed, completed] = terminal_events_in(h.commands)
    assert (failed.event.type, failed.event.redrives) == ("run.failed", None)
    assert (completed.event.type, completed.event.redrives) == ("run.completed", 1)
    assert completed.event.output == {"one": "first", "three": "third"}


def test_the_failed_attempts_late_completion_is_stale():
    h = failed_at_two()
    old = h.state.steps["two"].request_id or "r1/two/1"
    redrive(h)
    stale = succeeded(ActivityRequested(request_id=old, run_id="r1", step_id="two", activity="w", attempt=1), "late")
    assert [i.reason for i in ignored_in(h.deliver(stale))] == ["stale_attempt"]


def test_a_failed_sub_workflow_step_starts_a_fresh_child_run():
    h = Harness(machine_from(PARENT, CHILD))
    [first] = [c.accepted for c in h.start("parent") if isinstance(c, StartChildRun)]
    h.deliver(ChildRunFinished(run_id="r1", step_key="sub", child_run_id=first.run_id, status="failed"))
    assert h.status == "failed"
    [fresh] = [c.accepted for c in redrive(h) if isinstance(c, StartChildRun)]
    assert (first.run_id, fresh.run_id) == ("r1/sub", "r1/sub~1")
    late = h.deliver(ChildRunFinished(run_id="r1", step_key="sub", child_run_id=first.run_id, status="succeeded"))
    assert [i.reason for i in ignored_in(late)] == ["stale_child"]
    h.deliver(ChildRunFinished(run_id="r1", step_key="sub", child_run_id=fresh.run_id, status="succeeded", output=1))
    assert h.status == "succeeded" and h.state.redrives == 1


@pytest.mark.parametrize("how,detail", [
    ("running", "the run is running: only a failed run can be redriven"),
    ("succeeded", "the run is succeeded: only a failed run can be redriven"),
    ("cancelled", "the run is cancelled: only a failed run can be redriven"),
    ("unknown", "unknown run (or forgotten after its retention)"),
])
def test_a_run_that_did_not_fail_is_left_as_it_is_and_the_refusal_counted(how, detail):
    h = Harness(machine_from(THREE))
    if how != "unknown":
        h.start("three")
    if how == "succeeded":
        for step in ("one", "two", "three"):
            h.succeed(step, 1)
    elif how == "cancelled":
        h.deliver(RunCancelRequested(run_id="r1"))
    before = h.state
    out = redrive(h)
    assert [(i.reason, i.detail) for i in ignored_in(out)] == [("redrive_refused", detail)] and len(out) == 1
    assert h.state == before


def test_a_run_that_failed_at_its_fail_step_is_refused_it_would_fail_there_again():
    h = Harness(machine_from(FAILING))
    h.start("failing")
    assert h.status == "failed"
    [refused] = ignored_in(redrive(h))
    assert refused.detail == "the run ended at its fail step 'stop' (refused): it would end there again: trigger the run again"


def test_a_copy_of_a_timer_fired_before_the_redrive_is_stale():
    h = Harness(machine_from(THREE))
    h.start("three", now=T0)
    h.fire("run:timeout")
    assert h.status == "failed" and h.terminal().event.error.type == "RunTimeout"
    redrive(h)
    assert [i.reason for i in ignored_in(h.deliver(fired("r1", "run:timeout")))] == ["stale_timer"]
    h.succeed("one", 1)
    h.succeed("two", 2)
    h.succeed("three", 3)
    assert set(h.state.timers) == {"run:retention~1"}
    assert [i.reason for i in ignored_in(h.deliver(fired("r1", "run:retention")))] == ["run_finished"]
    assert h.deliver(fired("r1", "run:retention~1"))[0].run_id == "r1" and h.state is None


def test_a_redriven_run_that_fails_again_can_be_redriven_again():
    h = failed_at_two()
    redrive(h)
    h.fail("two", "Bad", retryable=False)
    assert h.status == "failed" and [e.event.redrives for e in terminal_events_in(h.commands)] == [None, 1]
    [request] = requests_in(redrive(h))
    assert request.attempt == 3 and h.state.redrives == 2
