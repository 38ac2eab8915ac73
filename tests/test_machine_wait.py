"""Given/when/then tables for ``wait`` (signals) and ``sleep`` (durable timers) on the pure state machine."""
from __future__ import annotations

import pytest

import json

from legato.topics.models import RunCancelRequested, SignalSent
from legato.workflows import keys
from legato.workflows.machine import SignalRefused, StartTimer
from legato.workflows.model import DefinitionError
from legato.workflows.state import MAX_PENDING_SIGNALS
from legato.workflows.transitions import SignalIgnored, StepFinished, StepWaiting
from tests.machine_helpers import T0, Harness, compile_yaml, ignored_in, machine_from, requests_in, succeeded, timers_in

APPROVAL = """
name: approval
steps:
  - id: draft
    activity: write
  - id: approval
    wait: {signal: approve, timeout: 48h}
  - id: publish
    activity: publish
    input: {decision: "${ steps.approval.output }"}
"""


def signal(name: str = "approve", data=None, signal_id: str | None = None, run_id: str = "r1") -> SignalSent:
    return SignalSent(run_id=run_id, signal=name, data=data, signal_id=signal_id)


def waiting_at_approval(text: str = APPROVAL) -> Harness:
    h = Harness(machine_from(text))
    h.start("approval")
    h.succeed("draft", {"text": "hi"})
    return h


# --- a signal completes the wait ------------------------------------------------------------------


def test_a_wait_step_waits_with_its_signal_name_and_a_durable_timeout():
    h = waiting_at_approval()
    step = h.state.steps["approval"]
    assert (step.status, step.signal) == ("waiting", "approve")
    [timer] = timers_in(h.last)
    assert timer.timer_id == keys.wait_timeout("approval") and timer.due_ms == h.now + 48 * 3600 * 1000
    assert h.pending() == []


def test_a_signal_after_the_wait_started_completes_it_with_the_signal_data():
    h = waiting_at_approval()
    out = h.deliver(signal(data={"decision": "approve"}))
    assert h.state.steps["approval"].status == "succeeded"
    assert h.state.steps["approval"].output == {"decision": "approve"}
    assert [r.input for r in requests_in(out)] == [{"decision": {"decision": "approve"}}]
    assert keys.wait_timeout("approval") not in h.state.timers


def test_a_signal_before_the_wait_started_is_kept_and_delivered_when_it_starts():
    h = Harness(machine_from(APPROVAL))
    h.start("approval")
    h.deliver(signal(data="early", signal_id="s1"))
    assert [s.signal for s in h.state.signals] == ["approve"] and h.state.steps["draft"].status == "running"
    out = h.succeed("draft", {"text": "hi"})
    assert h.state.steps["approval"].status == "succeeded" and h.state.steps["approval"].output == "early"
    assert h.state.signals == [] and h.pending_steps() == ["publish"]
    assert keys.wait_timeout("approval") not in h.state.timers


def test_a_repeated_signal_id_is_ignored_and_counted():
    h = Harness(machine_from(APPROVAL))
    h.start("approval")
    h.deliver(signal(data=1, signal_id="s1"))
    state = h.state.model_dump()
    machine = h.machine
    decision = machine.decide_events(h.state, signal(data=2, signal_id="s1"), h.now)
    [ignored] = ignored_in(decision.commands)
    assert ignored.reason == "duplicate_signal"
    assert decision.events == [SignalIgnored(run_id="r1", workflow="approval", signal="approve", reason="duplicate_signal")]
    assert decision.state.model_dump() == state


def test_a_signal_for_an_unknown_or_finished_run_is_ignored():
    m = machine_from(APPROVAL)
    state, out = m.decide(None, signal(), T0)
    assert state is None and [c.reason for c in ignored_in(out)] == ["unknown_run"]
    h = waiting_at_approval()
    h.deliver(RunCancelRequested(run_id="r1", reason="stop"))
    out = h.deliver(signal())
    assert [c.reason for c in ignored_in(out)] == ["run_finished"]


def test_past_the_limit_of_kept_signals_a_signal_is_refused_and_the_state_unchanged():
    h = Harness(machine_from(APPROVAL))
    h.start("approval")
    for i in range(MAX_PENDING_SIGNALS):
        h.deliver(signal(name=f"other{i}"))
    before = h.state.model_dump()
    out = h.deliver(signal(name="one_too_many", signal_id="x"))
    [refused] = [c for c in out if isinstance(c, SignalRefused)]
    assert refused.signal.signal == "one_too_many" and "64" in refused.reason
    assert h.state.model_dump() == before


TWO_WAITS = """
name: two
steps:
  - id: both
    parallel:
      branches:
        first: [{id: w1, wait: {signal: go}}]
        second: [{id: w2, wait: {signal: go}}]
"""


def test_two_waits_on_one_name_are_completed_oldest_first_one_per_signal():
    h = Harness(machine_from(TWO_WAITS))
    h.start("two")
    h.deliver(signal("go", data="a"))
    assert (h.state.steps["both/first/w1"].status, h.state.steps["both/second/w2"].status) == ("succeeded", "waiting")
    h.deliver(signal("go", data="b"))
    assert h.state.status == "succeeded" and h.state.output == {"first": "a", "second": "b"}


# --- timeouts -------------------------------------------------------------------------------------

# given on_timeout, when the timeout fires, then the run is in this status and `publish` gets this output
ON_TIMEOUT = [
    ("fail", "failed", None),
    ("continue", "running", None),
    ({"default": {"decision": "reject"}}, "running", {"decision": "reject"}),
]


@pytest.mark.parametrize("on_timeout,run_status,output", ON_TIMEOUT, ids=["fail", "continue", "default"])
def test_each_on_timeout(on_timeout, run_status, output):
    text = json.dumps({
        "name": "approval",
        "steps": [
            {"id": "draft", "activity": "write"},
            {"id": "approval", "wait": {"signal": "approve", "timeout": "1h", "on_timeout": on_timeout}},
            {"id": "publish", "activity": "publish", "input": {"decision": "${ steps.approval.output }"}},
        ],
    })
    h = waiting_at_approval(text)
    h.fire(keys.wait_timeout("approval"))
    step = h.state.steps["approval"]
    assert step.status == "timed_out" and step.error.type == "WaitTimeout"
    assert h.state.status == run_status
    if run_status == "failed":
        assert h.terminal().event.error.type == "WaitTimeout"
    else:
        assert h.pending_for("publish").input == {"decision": output}


def test_a_signal_after_the_timeout_does_not_complete_the_timed_out_wait():
    h = waiting_at_approval(APPROVAL.replace("timeout: 48h", "timeout: 48h, on_timeout: continue"))
    h.fire(keys.wait_timeout("approval"))
    h.deliver(signal(data="late"))
    assert h.state.steps["approval"].status == "timed_out" and h.state.steps["approval"].output is None
    assert [s.data for s in h.state.signals] == ["late"]


def test_on_timeout_without_a_timeout_is_refused():
    with pytest.raises(DefinitionError) as err:
        compile_yaml("""
        name: bad
        steps: [{id: w, wait: {signal: go, on_timeout: continue}}]
        """)
    assert err.value.path == "steps[0].wait" and "timeout" in err.value.reason


@pytest.mark.parametrize("wait,path", [
    ({"signal": "bad name!"}, "steps[0].wait.signal"),
    ({"timeout": "1h"}, "steps[0].wait.signal"),
    ({"signal": "go", "timeout": "soon"}, "steps[0].wait.timeout"),
    ({"signal": "go", "timeout": "1h", "on_timeout": "retry"}, "steps[0].wait.on_timeout"),
])
def test_bad_waits_are_refused_with_their_path(wait, path):
    with pytest.raises(DefinitionError) as err:
        compile_yaml(json.dumps({"name": "bad", "steps": [{"id": "w", "wait": wait}]}))
    assert err.value.path == path


# --- waits compose --------------------------------------------------------------------------------

REVISE = """
name: revise
steps:
  - id: review
    loop:
      max_iterations: 5
      until: "steps.verdict.output.approved"
      steps:
        - id: write
          activity: write
        - id: verdict
          wait: {signal: review}
"""


def test_a_wait_in_a_loop_waits_again_each_iteration_until_approved():
    h = Harness(machine_from(REVISE))
    h.start("revise")
    for i, approved in enumerate((False, False, True)):
        h.succeed("write", {"draft": i})
        assert h.state.steps[f"review#{i}/verdict"].status == "waiting"
        h.deliver(signal("review", data={"approved": approved}))
    assert h.state.status == "succeeded"
    assert h.state.steps["review"].iteration == 2 and h.state.steps["review"].ended_by == "until"


APPROVERS = """
name: approvers
steps:
  - id: approvals
    parallel:
      join: {n_of: 2}
      branches:
        legal: [{id: legal, wait: {signal: legal}}]
        finance: [{id: finance, wait: {signal: finance}}]
        ops: [{id: ops, wait: {signal: ops}}]
"""


def test_two_of_three_approvers_by_n_of_and_the_third_stops_waiting():
    h = Harness(machine_from(APPROVERS))
    h.start("approvers")
    h.deliver(signal("ops", data="ok-ops"))
    decision = h.machine.decide_events(h.state, signal("legal", data="ok-legal"), h.now)
    h.state = decision.state
    assert h.state.status == "succeeded" and h.state.output == {"legal": "ok-legal", "ops": "ok-ops"}
    assert h.state.steps["approvals/finance/finance"].status == "cancelled"
    stopped = [e for e in decision.events if isinstance(e, StepFinished) and e.step_id == "finance"]
    assert stopped and stopped[0].previous == "waiting" and stopped[0].signal == "finance"


def test_cancel_while_waiting_stops_the_wait():
    h = waiting_at_approval()
    decision = h.machine.decide_events(h.state, RunCancelRequested(run_id="r1", reason="no longer needed"), h.now + 5)
    assert decision.state.status == "cancelled"
    assert decision.state.steps["approval"].status == "cancelled" and set(decision.state.timers) == {"run:retention"}
    [finished] = [e for e in decision.events if isinstance(e, StepFinished)]
    assert (finished.step_id, finished.previous, finished.status) == ("approval", "waiting", "cancelled")


def test_a_run_timeout_ends_a_waiting_run():
    h = waiting_at_approval(APPROVAL.replace("name: approval", "name: approval\ntimeout: 1h"))
    h.fire(keys.RUN_TIMEOUT)
    assert h.state.status == "failed" and h.terminal().event.error.type == "RunTimeout"
    assert h.state.steps["approval"].status == "cancelled"


def test_waiting_emits_a_domain_event_with_the_signal():
    h = Harness(machine_from(APPROVAL))
    h.start("approval")
    decision = h.machine.decide_events(h.state, succeeded(h.pending_for("draft"), {"text": "x"}), h.now + 10)
    assert StepWaiting(run_id="r1", workflow="approval", key="approval", step_id="approval", signal="approve") in decision.events


# --- sleep ----------------------------------------------------------------------------------------

SLEEP = """
name: nap
steps:
  - id: first
    activity: first
  - id: nap
    sleep: 10m
  - id: second
    activity: second
    input: {got: "${ steps.nap.output }"}
"""


def test_sleep_sets_a_durable_timer_and_passes_the_previous_output_on():
    h = Harness(machine_from(SLEEP))
    h.start("nap")
    out = h.succeed("first", {"v": 1}, now=T0 + 100)
    [timer] = timers_in(out)
    assert timer == StartTimer(run_id="r1", timer_id=keys.sleep_timer("nap"), due_ms=T0 + 100 + 600_000)
    assert h.state.steps["nap"].status == "running" and h.pending() == []
    h.fire(keys.sleep_timer("nap"))
    assert h.state.steps["nap"].status == "succeeded"
    assert h.pending_for("second").input == {"got": {"v": 1}}


@pytest.mark.parametrize("until,due", [
    ("input.at", T0 + 3_600_000),
    ("'2023-11-14T23:13:20Z'", 1_700_003_600_000),
    ("'2023-11-15T00:13:20+01:00'", 1_700_003_600_000),
    ("timestamp('2023-11-14T22:13:20Z') + duration('1h')", 1_700_003_600_000),
])
def test_sleep_until_an_epoch_ms_or_an_rfc3339_instant(until, due):
    h = Harness(machine_from(f"""
    name: until
    steps:
      - id: nap
        sleep: {{until: "{until}"}}
      - id: after
        activity: after
    """))
    out = h.start("until", {"at": T0 + 3_600_000})
    [timer] = timers_in(out)
    assert timer.timer_id == keys.sleep_timer("nap") and timer.due_ms == due
    h.fire(keys.sleep_timer("nap"))
    assert h.pending_steps() == ["after"]


def test_sleep_until_a_past_instant_does_not_wait():
    h = Harness(machine_from("""
    name: past
    steps:
      - id: nap
        sleep: {until: "input.at"}
      - id: after
        activity: after
    """))
    out = h.start("past", {"at": T0 - 1})
    assert timers_in(out)[0].timer_id.startswith("after") and h.pending_steps() == ["after"]


def test_sleep_until_a_bad_value_fails_the_step():
    h = Harness(machine_from("""
    name: bad
    steps: [{id: nap, sleep: {until: "'tomorrow'"}}]
    """))
    h.start("bad")
    assert h.state.status == "failed" and h.terminal().event.error.type == "ExpressionError"


def test_cancel_while_sleeping_clears_the_timer():
    h = Harness(machine_from(SLEEP))
    h.start("nap")
    h.succeed("first", {"v": 1})
    h.deliver(RunCancelRequested(run_id="r1", reason="stop"))
    assert h.state.status == "cancelled" and set(h.state.timers) == {"run:retention"}
    out = h.fire(keys.sleep_timer("nap"), now=h.now + 600_000)
    assert [c.reason for c in ignored_in(out)] == ["run_finished"]
