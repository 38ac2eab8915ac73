"""Given/when/then tables for stopping runs: RunCancelRequested (a user's or a parent's), the child runs a parent
stops waiting for (CancelChildRun), and ``on_budget: finish`` (nothing new starts, in-flight work is cancelled,
the run succeeds with what it has and says ``stopped_by: budget``). Hypothesis properties at the end."""
from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import event as tally
from hypothesis import given, note
from hypothesis import strategies as st

from tests.machine_helpers import T0, Harness, compile_yaml, dump, ignored_in, requests_in, run_events_in, succeeded, terminal_events_in
from tests.test_machine_properties import PROPERTY_SETTINGS, Drive, check_invariants, machine_for, scenarios
from legato.topics import codec
from legato.topics.models import ActivityCompleted, ChildRunFinished, Cost, RunAccepted, RunCancelRequested
from legato.topics.schemas import SCHEMA_DIR
from legato.workflows.machine import CancelChildRun, CancelRequest, EventIgnored, Machine, NotifyParent, RequestActivity, StartChildRun, outstanding, replay

CHILD = {"name": "child", "steps": [{"id": "c1", "activity": "child_work"}, {"id": "c2", "activity": "child_more"}]}


def machine(*docs: dict[str, Any]) -> Machine:
    return Machine({d["name"]: compile_yaml(json.dumps(d)) for d in docs})


def children_started(commands) -> list[RunAccepted]:
    return [c.accepted for c in commands if isinstance(c, StartChildRun)]


def children_cancelled(commands) -> list[RunCancelRequested]:
    return [c.cancel for c in commands if isinstance(c, CancelChildRun)]


def requests_cancelled(commands) -> list[str]:
    return [c.cancel.request_id for c in commands if isinstance(c, CancelRequest)]


def notices(commands) -> list[ChildRunFinished]:
    return [c.finished for c in commands if isinstance(c, NotifyParent)]


def cancel(run_id: str = "r1", reason: str = "not needed any more", requested_by: str | None = None) -> RunCancelRequested:
    return RunCancelRequested(run_id=run_id, reason=reason, requested_by=requested_by)


def costing(request, output: Any = None, usd: float = 0.0) -> ActivityCompleted:
    return succeeded(request, output, cost={"usd": usd})


# --- the record ---------------------------------------------------------------------------------------------


def test_a_users_cancel_record_decodes_and_matches_its_schema():
    raw = b'{"type": "run.cancel_requested", "run_id": "r1", "reason": "wrong input"}'
    record = codec.validate(RunCancelRequested, codec.decode_object(raw))
    assert record == RunCancelRequested(run_id="r1", reason="wrong input") and record.requested_by is None
    schema = json.loads((SCHEMA_DIR / "cancel.json").read_text())
    jsonschema.validate(json.loads(raw), schema)
    jsonschema.validate(json.loads(codec.dumps(cancel(requested_by="p"))), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"type": "run.cancel_requested", "run_id": ""}, schema)


# --- cancelling a run ---------------------------------------------------------------------------------------


def two_steps() -> Machine:
    return machine({"name": "w", "timeout": "1m", "steps": [{"id": "a", "activity": "a", "timeout": "5s"}, {"id": "b", "activity": "b"}]})


@pytest.mark.parametrize("reason,requested_by,message", [
    ("wrong input", None, "wrong input"),
    ("", None, "cancelled by a user"),
    ("", "ops-42", "cancelled by run ops-42"),
])
def test_a_cancelled_run_cancels_its_requests_and_ends_cancelled(reason, requested_by, message):
    h = Harness(two_steps())
    h.start("w")
    [req] = h.pending()
    out = h.deliver(cancel(reason=reason, requested_by=requested_by), now=T0 + 700)
    assert requests_cancelled(out) == [req.request_id] and not requests_in(out)
    assert h.status == "cancelled" and h.state.requests == {} and set(h.state.timers) == {"run:retention"}
    assert h.state.steps["a"].status == "cancelled" and h.state.cancelled_by == requested_by
    [end] = terminal_events_in(out)
    assert end.event.type == "run.cancelled" and end.event.status == "cancelled" and end.event.output is None
    assert end.event.error.type == "cancelled" and end.event.error.message == message and not end.event.error.retryable
    assert end.event.duration_ms == 700 and end.event.stopped_by is None
    assert notices(out) == []  # a top-level run has nobody to tell


def test_events_for_a_cancelled_run_are_ignored_and_change_nothing():
    h = Harness(two_steps())
    h.start("w")
    [req] = h.pending()
    h.deliver(cancel())
    snapshot = dump(h.state)
    for late in (succeeded(req, "late"), cancel(reason="again"), RunAccepted(run_id="r1", workflow="w")):
        out = h.deliver(late)
        assert [c.reason for c in ignored_in(out)] == ["duplicate_trigger" if isinstance(late, RunAccepted) else "run_finished"] and len(out) == 1
        assert dump(h.state) == snapshot
        if isinstance(late, RunCancelRequested):
            assert out[0].detail == "cancellation requested by a user: again"
    assert len(terminal_events_in(h.commands)) == 1


@pytest.mark.parametrize("when", ["unknown", "succeeded", "failed"])
def test_a_cancel_for_an_unknown_or_finished_run_is_ignored(when):
    m = two_steps()
    if when == "unknown":
        state, out = m.decide(None, cancel(run_id="ghost", requested_by="p"), T0)
        assert state is None and [(c.run_id, c.reason) for c in out] == [("ghost", "unknown_run")]
        assert "requested by p" in out[0].detail
        return
    h = Harness(m)
    h.start("w")
    if when == "succeeded":
        h.succeed("a", 1)
        h.succeed("b", 2)
    else:
        h.fail("a", retryable=False)
    snapshot = dump(h.state)
    out = h.deliver(cancel())
    assert [c.reason for c in out] == ["run_finished"] and isinstance(out[0], EventIgnored)
    assert dump(h.state) == snapshot and h.status == when


def test_a_run_whose_definition_was_removed_can_still_be_cancelled():
    h = Harness(two_steps())
    h.start("w")
    h.machine = Machine({})
    h.deliver(cancel())
    assert h.status == "cancelled" and h.terminal().event.type == "run.cancelled"


def test_a_cancel_request_replays_deterministically():
    h = Harness(two_steps())
    h.start("w")
    h.succeed("a", 1, now=T0 + 10)
    h.deliver(cancel(), now=T0 + 20)
    state, commands = replay(two_steps(), h.log)
    assert dump(state) == dump(h.state) and commands == h.commands


# --- a parent stops waiting for its child runs ---------------------------------------------------------------


def race(join: Any, other: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    """A parallel of a sub-workflow branch and a plain activity branch, then a step after it."""
    branches = {"sub": [{"id": "sub", "workflow": "child"}], "fast": other or [{"id": "fast", "activity": "fast"}]}
    return {"name": "parent", "steps": [{"id": "par", "parallel": {"branches": branches, "join": join, **spec}}, {"id": "after", "activity": "after"}]}


@pytest.mark.parametrize("join", ["any", "first_success", {"n_of": 1}])
def test_a_join_that_is_complete_cancels_the_child_run_of_the_losing_branch(join):
    p = Harness(machine(race(join), CHILD))
    [acc] = children_started(p.start("parent"))
    out = p.succeed("fast", "F")
    assert children_cancelled(out) == [RunCancelRequested(run_id=acc.run_id, reason="the join is complete", requested_by="r1")]
    assert p.state.steps["par/sub/sub"].status == "cancelled"
    assert [r.step_id for r in requests_in(out)] == ["after"]


def test_a_failed_branch_cancels_the_child_run_of_its_sibling():
    p = Harness(machine(race("all"), CHILD))
    [acc] = children_started(p.start("parent"))
    out = p.fail("fast", retryable=False)
    assert [c.run_id for c in children_cancelled(out)] == [acc.run_id] and p.status == "failed"
    assert children_cancelled(out)[0].reason == "a branch failed"


def test_a_join_timeout_cancels_the_child_run_it_gave_up_on():
    p = Harness(machine(race("all", timeout="30s", on_timeout="proceed"), CHILD))
    [acc] = children_started(p.start("parent"))
    p.succeed("fast", "F")
    out = p.fire("par:join_timeout")
    assert [(c.run_id, c.reason) for c in children_cancelled(out)] == [(acc.run_id, "join timeout")]
    assert p.state.steps["par/sub/sub"].status == "timed_out" and p.state.steps["par"].output == {"fast": "F"}


@pytest.mark.parametrize("on_error,then", [("fail", "failed"), ({"default": "D"}, "running"), ({"fallback": [{"id": "fb", "activity": "fb"}]}, "running")])
def test_a_sub_workflow_steps_own_timeout_cancels_its_child_run(on_error, then):
    doc = {"name": "parent", "steps": [{"id": "sub", "workflow": "child", "timeout": "10s", "on_error": on_error}, {"id": "after", "activity": "after"}]}
    p = Harness(machine(doc, CHILD))
    [acc] = children_started(p.start("parent"))
    out = p.fire("sub:timeout:1")
    assert [(c.run_id, c.reason, c.requested_by) for c in children_cancelled(out)] == [(acc.run_id, "the step timed out", "r1")]
    assert p.status == then
    # the child no longer holds the parent: finishing the run later does not cancel it again
    p.deliver(cancel())
    assert len(children_cancelled(p.commands)) == 1


def test_a_loop_timeout_cancels_the_child_run_of_the_running_iteration():
    doc = {"name": "parent", "steps": [{"id": "l", "loop": {"max_iterations": 3, "timeout": "1m", "on_exhausted": "continue",
                                                           "steps": [{"id": "sub", "workflow": "child"}]}}]}
    p = Harness(machine(doc, CHILD))
    [acc] = children_started(p.start("parent"))
    out = p.fire("l:loop_timeout")
    assert [c.run_id for c in children_cancelled(out)] == [acc.run_id] == ["r1/l#0/sub"]


def parent_with(step: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A parent whose child run is in flight in one branch while ``step`` runs in the other."""
    return {"name": "parent", "steps": [{"id": "par", "parallel": {"branches": {"sub": [{"id": "sub", "workflow": "child"}],
                                                                               "other": [{"id": "o", "activity": "o"}, step]}}}], **top}


@pytest.mark.parametrize("given_step,top,when,status,reason", [
    ({"id": "stop", "end": {"output": "'early'"}}, {}, "o succeeds", "succeeded", "the run finished"),
    ({"id": "refuse", "fail": {"reason": "'no'"}}, {}, "o succeeds", "failed", "a branch failed"),
    ({"id": "x", "activity": "x"}, {"budget": {"usd": 0.1}}, "o goes over budget", "failed", "the run finished"),
    ({"id": "x", "activity": "x"}, {"budget": {"usd": 0.1}, "on_budget": "finish"}, "o goes over budget", "succeeded", "the run finished"),
    ({"id": "x", "activity": "x"}, {"timeout": "1m"}, "the run times out", "failed", "the run finished"),
    ({"id": "x", "activity": "x"}, {}, "a user cancels the parent", "cancelled", "the run was cancelled"),
])
def test_a_parent_that_ends_cancels_its_running_child_runs(given_step, top, when, status, reason):
    p = Harness(machine(parent_with(given_step, **top), CHILD))
    [acc] = children_started(p.start("parent"))
    if when == "o succeeds":
        out = p.succeed("o", "O")
    elif when == "o goes over budget":
        out = p.deliver(costing(p.pending_for("o"), "O", usd=0.5))
    elif when == "the run times out":
        out = p.fire("run:timeout")
    else:
        out = p.deliver(cancel(reason="stop it"))
    assert p.status == status
    [stop] = children_cancelled(out)
    assert stop.run_id == acc.run_id and stop.requested_by == "r1"
    assert stop.reason == reason
    assert p.state.steps["par/sub/sub"].status == "cancelled"
    assert not children_started(outstanding(p.state)), "a cancelled child run is not started again after a crash"


def test_a_child_whose_result_is_in_is_not_cancelled():
    p = Harness(machine(parent_with({"id": "stop", "end": {}}), CHILD))
    [acc] = children_started(p.start("parent"))
    p.deliver(ChildRunFinished(run_id="r1", step_key="par/sub/sub", child_run_id=acc.run_id, status="succeeded", output=1))
    out = p.succeed("o", "O")
    assert p.status == "succeeded" and children_cancelled(out) == []


def test_a_child_whose_fallback_runs_is_not_cancelled_but_the_fallbacks_request_is():
    doc = {"name": "parent", "timeout": "1m", "steps": [{"id": "sub", "workflow": "child", "on_error": {"fallback": [{"id": "fb", "activity": "fb"}]}}]}
    p = Harness(machine(doc, CHILD))
    [acc] = children_started(p.start("parent"))
    p.deliver(ChildRunFinished(run_id="r1", step_key="sub", child_run_id=acc.run_id, status="failed"))
    [fb] = p.pending()
    out = p.fire("run:timeout")
    assert children_cancelled(out) == [] and requests_cancelled(out) == [fb.request_id]


# --- the child's side ---------------------------------------------------------------------------------------


GRANDPARENT = {"name": "parent", "steps": [{"id": "sub", "workflow": "mid"}, {"id": "after", "activity": "after"}]}
MID = {"name": "mid", "steps": [{"id": "par", "parallel": {"branches": {"deep": [{"id": "deep", "workflow": "child"}], "work": [{"id": "w", "activity": "w"}]}}}]}


def three_generations() -> tuple[Machine, Harness, Harness, RunAccepted]:
    m = machine(GRANDPARENT, MID, CHILD)
    p = Harness(m)
    [acc] = children_started(p.start("parent"))
    mid = Harness(m, run_id=acc.run_id)
    [grandchild] = children_started(mid.deliver(acc))
    return m, p, mid, grandchild


def test_a_child_cancelled_by_its_parent_stops_its_own_children_and_tells_nobody():
    m, p, mid, grandchild = three_generations()
    [work] = mid.pending()
    [stop] = children_cancelled(p.deliver(cancel(reason="user said so")))
    out = mid.deliver(stop)
    assert mid.status == "cancelled" and mid.state.cancelled_by == "r1"
    assert requests_cancelled(out) == [work.request_id]
    assert children_cancelled(out) == [RunCancelRequested(run_id=grandchild.run_id, reason="the run was cancelled", requested_by=mid.run_id)]
    assert notices(out) == [], "the parent that asked has moved on"
    assert [e.event.type for e in run_events_in(out)] == ["run.cancelled"]
    assert notices(outstanding(mid.state)) == [] and [e.event.type for e in run_events_in(outstanding(mid.state))] == ["run.cancelled"]
    # and down one more generation
    low = Harness(m, run_id=grandchild.run_id)
    low.deliver(grandchild)
    out = low.deliver(children_cancelled(out)[0])
    assert low.status == "cancelled" and notices(out) == []


def test_a_child_cancelled_by_someone_else_tells_its_parent_which_applies_on_error():
    doc = {"name": "parent", "steps": [{"id": "sub", "workflow": "child", "on_error": {"default": "D"}}, {"id": "after", "activity": "after", "input": {"got": "${ steps.sub.output }"}}]}
    m = machine(doc, CHILD)
    p = Harness(m)
    [acc] = children_started(p.start("parent"))
    child = Harness(m, run_id=acc.run_id)
    child.deliver(acc)
    [notice] = notices(child.deliver(cancel(run_id=acc.run_id, reason="operator")))
    assert notice.status == "failed" and notice.error.type == "cancelled" and notice.error.message == "operator"
    assert notices(outstanding(child.state)) == [notice]
    out = p.deliver(notice)
    assert p.state.steps["sub"].output == "D" and [r.input for r in requests_in(out)] == [{"got": "D"}]


@pytest.mark.parametrize("parent_after", ["still running", "finished"])
def test_a_notice_from_a_child_the_parent_cancelled_is_ignored_as_stale(parent_after):
    """The child finished just before its cancellation reached it: its notice arrives after the parent moved on."""
    join_doc = race("any")
    m = machine(join_doc, CHILD)
    p = Harness(m)
    [acc] = children_started(p.start("parent"))
    child = Harness(m, run_id=acc.run_id)
    child.deliver(acc)
    child.succeed("c1", 1)
    [notice] = notices(child.succeed("c2", 2))
    [stop] = children_cancelled(p.succeed("fast", "F"))
    assert [c.reason for c in child.deliver(stop)] == ["run_finished"] and child.status == "succeeded"
    if parent_after == "finished":
        p.succeed("after", "A")
    snapshot = dump(p.state)
    assert [c.reason for c in p.deliver(notice)] == (["stale_child"] if parent_after == "still running" else ["run_finished"])
    assert dump(p.state) == snapshot


def test_outstanding_resends_the_cancellation_of_an_abandoned_child():
    p = Harness(machine(race("any"), CHILD))
    [acc] = children_started(p.start("parent"))
    p.succeed("fast", "F")
    [again] = children_cancelled(outstanding(p.state))
    assert again.run_id == acc.run_id and again.requested_by == "r1"


# --- on_budget: finish --------------------------------------------------------------------------------------


def budget_doc(steps: list[dict[str, Any]], output: str | None = None, usd: float = 0.1) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": "b", "budget": {"usd": usd}, "on_budget": "finish", "steps": steps}
    if output is not None:
        doc["output"] = output
    return doc


SEQ = [{"id": "a", "activity": "a"}, {"id": "b", "activity": "b"}, {"id": "c", "activity": "c"}]


@pytest.mark.parametrize("output,expected", [
    (None, {"a": "A"}),  # no output expression: the outputs so far, by step id
    ("{'first': steps.a.output}", {"first": "A"}),  # an output that can be computed from what the run has
    ("{'last': steps.c.output}", {"a": "A"}),  # one that cannot (c never ran): the outputs so far
])
def test_over_budget_nothing_new_starts_and_the_run_succeeds_with_what_it_has(output, expected):
    h = Harness(machine(budget_doc(SEQ, output)))
    h.start("b")
    out = h.deliver(costing(h.pending_for("a"), "A", usd=0.2))
    assert not requests_in(out) and not children_started(out)
    end = h.terminal().event
    assert end.type == "run.completed" and end.status == "succeeded" and end.output == expected
    assert end.stopped_by == "budget" and end.error is None and set(h.state.timers) == {"run:retention"}


def test_under_budget_the_run_is_not_marked():
    h = Harness(machine(budget_doc(SEQ)))
    h.start("b")
    for step in ("a", "b", "c"):
        h.deliver(costing(h.pending_for(step), step.upper(), usd=0.01))
    assert h.terminal().event.output == "C" and h.terminal().event.stopped_by is None


def test_going_over_budget_with_the_last_completion_finishes_normally_but_marked():
    h = Harness(machine(budget_doc(SEQ)))
    h.start("b")
    h.succeed("a", "A")
    h.succeed("b", "B")
    h.deliver(costing(h.pending_for("c"), "C", usd=1))
    end = h.terminal().event
    assert end.output == "C" and end.stopped_by == "budget"


def test_a_loop_stops_at_its_check_and_the_step_after_it_does_not_start():
    """As the integration workflow sem_budget_finish, without its output: each call costs 0.004, the budget 0.01."""
    doc = budget_doc([{"id": "spend", "loop": {"max_iterations": 10, "steps": [{"id": "call", "activity": "cost", "input": {"n": "${ iteration }"}}]}},
                      {"id": "after", "activity": "echo", "input": {"last": "${ steps.spend.output.n }"}}], usd=0.01)
    h = Harness(machine(doc))
    h.start("b")
    for i in range(3):
        out = h.deliver(costing(h.pending_for("call"), {"n": i}, usd=0.004))
    assert not requests_in(out)
    loop = h.state.steps["spend"]
    assert loop.ended_by == "budget" and loop.status == "succeeded" and loop.iteration == 2
    end = h.terminal().event
    assert end.output == {"call": {"n": 2}, "spend": {"n": 2}} and end.stopped_by == "budget" and end.cost["usd"] == 0.012


def test_in_flight_requests_and_child_runs_are_cancelled_and_running_loops_keep_their_last_iteration():
    doc = budget_doc([{"id": "par", "parallel": {"branches": {
        "costly": [{"id": "costly", "activity": "costly"}],
        "sub": [{"id": "sub", "workflow": "child"}],
        "refine": [{"id": "l", "loop": {"max_iterations": 5, "steps": [{"id": "draft", "activity": "draft"}]}}],
        "slow": [{"id": "slow", "activity": "slow"}],
    }}}, {"id": "after", "activity": "after"}])
    h = Harness(machine(doc, CHILD))
    [acc] = children_started(h.start("b"))
    h.succeed("draft", "d0")
    [draft1, slow] = [h.pending_for("draft"), h.pending_for("slow")]
    out = h.deliver(costing(h.pending_for("costly"), "C", usd=1))
    assert not requests_in(out) and not children_started(out)
    assert sorted(requests_cancelled(out)) == sorted([draft1.request_id, slow.request_id])
    assert [c.run_id for c in children_cancelled(out)] == [acc.run_id]
    loop = h.state.steps["par/refine/l"]
    assert loop.ended_by == "budget" and loop.status == "succeeded" and loop.output == "d0"
    end = h.terminal().event
    assert end.status == "succeeded" and end.stopped_by == "budget"
    assert end.output == {"costly": "C", "l": "d0"}  # the join never completed: the outputs so far (not the cancelled draft)


def test_an_inner_loop_stopped_by_the_budget_lets_its_outer_loop_make_its_check():
    doc = budget_doc([{"id": "outer", "loop": {"max_iterations": 5, "steps": [
        {"id": "inner", "loop": {"max_iterations": 5, "steps": [{"id": "x", "activity": "x"}, {"id": "y", "activity": "y"}]}}]}}],
        output="{'outer': steps.outer.output}")
    h = Harness(machine(doc))
    h.start("b")
    h.succeed("x", 1)
    h.succeed("y", "y0")
    h.deliver(costing(h.pending_for("x"), 2, usd=1))  # over budget in the middle of the inner loop's second iteration
    inner, outer = h.state.steps["outer#0/inner"], h.state.steps["outer"]
    assert (inner.ended_by, inner.status, inner.output) == ("budget", "succeeded", "y0")
    assert (outer.ended_by, outer.status, outer.output) == ("budget", "succeeded", "y0")
    assert h.terminal().event.output == {"outer": "y0"} and h.state.requests == {}


def test_a_step_waiting_to_retry_is_not_tried_again():
    doc = budget_doc([{"id": "par", "parallel": {"branches": {
        "flaky": [{"id": "flaky", "activity": "flaky", "retry": {"max_attempts": 3, "backoff": "1s"}}],
        "costly": [{"id": "costly", "activity": "costly"}]}}}])
    h = Harness(machine(doc))
    h.start("b")
    h.fail("flaky")
    assert h.state.steps["par/flaky/flaky"].status == "waiting_retry"
    h.deliver(costing(h.pending_for("costly"), "C", usd=1))
    assert h.status == "succeeded" and set(h.state.timers) == {"run:retention"}
    assert [r.step_id for r in requests_in(h.commands)].count("flaky") == 1


def test_a_run_left_running_over_budget_by_an_earlier_version_ends_at_its_next_event():
    h = Harness(machine(budget_doc(SEQ)))
    h.start("b")
    h.state.budget_exhausted = True  # the old on_budget: finish went on after the budget ran out
    out = h.succeed("a", "A")
    assert not requests_in(out) and h.terminal().event.stopped_by == "budget"


def test_on_budget_fail_is_unchanged():
    doc = {**budget_doc(SEQ), "on_budget": "fail"}
    h = Harness(machine(doc))
    h.start("b")
    h.deliver(costing(h.pending_for("a"), "A", usd=1))
    end = h.terminal().event
    assert end.status == "failed" and end.error.type == "budget_exceeded" and end.stopped_by is None


# --- properties ---------------------------------------------------------------------------------------------


def over_budget(scenario: tuple[dict[str, Any], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    doc, run_input = scenario
    return {**doc, "budget": {"usd": 0.0025}, "on_budget": "finish"}, run_input  # every completion costs 0.001


@PROPERTY_SETTINGS
@given(scenario=scenarios().map(over_budget), data=st.data())
def test_over_budget_a_random_run_ends_in_that_decision_and_starts_nothing(scenario, data):
    doc, run_input = scenario
    note(yaml.safe_dump(doc, sort_keys=False))
    drive = Drive(machine_for(doc), data)
    drive.deliver(RunAccepted(run_id="run-1", workflow="gen", input=run_input))
    while not drive.state.finished:
        assert len(drive.log) < 500
        pending = set(drive.state.requests)
        out_start = len(drive.commands)
        drive.advance(drive.state)
        check_invariants(drive.state)
        out = drive.commands[out_start:]
        if drive.state.budget_exhausted:
            assert drive.state.finished, "the decision that goes over budget ends the run"
            assert not [c for c in out if isinstance(c, (RequestActivity, StartChildRun))]
            completed = getattr(drive.log[-1][0], "request_id", None)  # a child run's end (with its cost) may be the one
            assert set(requests_cancelled(out)) == pending - {completed}
            end = terminal_events_in(out)[0].event
            assert end.status != "succeeded" or end.stopped_by == "budget"
    tally(f"over budget: {drive.state.budget_exhausted}, {drive.state.status}")
    assert len(terminal_events_in(drive.commands)) == 1
    state, commands = replay(machine_for(doc), drive.log)
    assert dump(state) == dump(drive.state) and commands == drive.commands


@PROPERTY_SETTINGS
@given(scenario=scenarios(), data=st.data())
def test_a_random_run_cancelled_at_a_random_moment_ends_cancelled_with_nothing_left(scenario, data):
    doc, run_input = scenario
    note(yaml.safe_dump(doc, sort_keys=False))
    drive = Drive(machine_for(doc), data)
    drive.deliver(RunAccepted(run_id="run-1", workflow="gen", input=run_input))
    for _ in range(data.draw(st.integers(0, 12), label="events before the cancel")):
        if drive.state.finished:
            break
        drive.advance(drive.state)
    before = drive.state
    pending = set(before.requests)
    out = drive.deliver(cancel(run_id="run-1", reason="property"))
    tally(f"cancelled while {'finished' if before.finished else 'running'}")
    if before.finished:
        assert [c.reason for c in out] == ["run_finished"] and drive.state is before
    else:
        assert drive.state.status == "cancelled" and drive.state.requests == {} and set(drive.state.timers) == {"run:retention"}
        assert set(requests_cancelled(out)) == pending and not requests_in(out)
        [end] = terminal_events_in(out)
        assert end.event.type == "run.cancelled" and end.event.error.message == "property"
    for event, _ in drive.log[:-1]:
        late = drive.deliver(event)
        assert late and all(isinstance(c, EventIgnored) for c in late)
    assert len(terminal_events_in(drive.commands)) == 1
    state, commands = replay(machine_for(doc), drive.log)
    assert dump(state) == dump(drive.state) and commands == drive.commands


@st.composite
def family(draw: Any) -> dict[str, Any]:
    """A parent whose steps mix activities and sub-workflow steps under parallel joins, loops and timeouts."""
    counter = iter(range(1000))

    def leaf() -> dict[str, Any]:
        n = next(counter)
        if draw(st.booleans()):
            step: dict[str, Any] = {"id": f"s{n}", "workflow": "child"}
            if draw(st.booleans()):
                step["timeout"] = "10s"
            step["on_error"] = draw(st.sampled_from(["fail", "continue", {"default": 0}, {"fallback": [{"id": f"fb{n}", "activity": "fb"}]}]))
            return step
        return {"id": f"a{n}", "activity": "act", "timeout": "5s"}

    def seq(depth: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(draw(st.integers(1, 2))):
            kind = draw(st.sampled_from(["leaf", "leaf", "parallel", "loop", "end"] if depth < 2 else ["leaf"]))
            n = next(counter)
            if kind == "leaf":
                out.append(leaf())
            elif kind == "end":
                out.append({"id": f"e{n}", "end": {"when": f"input.n == {draw(st.integers(0, 2))}"}})
            elif kind == "parallel":
                spec: dict[str, Any] = {"branches": {f"b{i}": seq(depth + 1) for i in range(draw(st.integers(2, 3)))},
                                        "join": draw(st.sampled_from(["all", "any", "first_success", {"n_of": 1}]))}
                if draw(st.booleans()):
                    spec.update(timeout="20s", on_timeout=draw(st.sampled_from(["proceed", "fail"])))
                out.append({"id": f"p{n}", "parallel": spec})
            else:
                loop: dict[str, Any] = {"max_iterations": draw(st.integers(1, 3)), "on_exhausted": "continue", "steps": seq(depth + 1)}
                if draw(st.booleans()):
                    loop["timeout"] = "40s"
                out.append({"id": f"l{n}", "loop": loop})
        return out

    doc: dict[str, Any] = {"name": "fam", "steps": seq(0), "timeout": "2m"}
    if draw(st.booleans()):
        doc.update(budget={"usd": 0.0025}, on_budget=draw(st.sampled_from(["fail", "finish"])))
    return doc


@PROPERTY_SETTINGS
@given(doc=family(), data=st.data())
def test_every_child_run_a_parent_started_either_reports_back_or_is_told_to_stop_exactly_once(doc, data):
    note(yaml.safe_dump(doc, sort_keys=False))
    m = Machine({"fam": compile_yaml(json.dumps(doc)), "child": compile_yaml(json.dumps(CHILD))})
    h = Harness(m)
    h.start("fam", {"n": data.draw(st.integers(0, 3), label="n")})
    started: dict[str, RunAccepted] = {}
    reported: set[str] = set()
    while h.state.finished is False:
        assert len(h.log) < 300
        started.update({a.run_id: a for a in children_started(h.last)})
        waiting = [s for s in h.state.steps.values() if s.kind == "workflow" and s.status == "running" and not s.children]
        options = ["request"] * bool(h.state.requests) * 3 + ["child"] * bool(waiting) * 3 + ["timer"] * bool(h.state.timers) + ["cancel"]
        action = data.draw(st.sampled_from(options), label="action")
        if action == "request":
            rid = data.draw(st.sampled_from(sorted(h.state.requests)), label="request")
            req = next(c.request for c in h.commands if isinstance(c, RequestActivity) and c.request.request_id == rid)
            h.deliver(succeeded(req, 1, cost={"usd": 0.001}))
        elif action == "child":
            step = data.draw(st.sampled_from(sorted(waiting, key=lambda s: s.key)), label="child")
            ok = data.draw(st.booleans(), label="child ok")
            h.deliver(ChildRunFinished(run_id="r1", step_key=step.key, child_run_id=step.child_run, status="succeeded" if ok else "failed",
                                       output=1 if ok else None, cost={"usd": 0.001}))
            reported.add(step.child_run)
        elif action == "timer":
            h.fire(data.draw(st.sampled_from(sorted(h.state.timers)), label="timer"))
        else:
            h.deliver(cancel(reason="property"))
        stopped = [c.run_id for c in children_cancelled(h.commands)]
        assert len(stopped) == len(set(stopped)), "a child run is told to stop once"
        assert not set(stopped) & reported, "a child that reported back is not told to stop"
        still_waiting = {s.child_run for s in h.state.steps.values() if s.kind == "workflow" and s.status == "running" and not s.children}
        assert not set(stopped) & still_waiting, "a child the parent still waits for is not told to stop"
    started.update({a.run_id: a for a in children_started(h.last)})
    stopped = {c.run_id for c in children_cancelled(h.commands)}
    assert set(started) == reported | stopped, "when the parent ends, every child it started has reported back or is told to stop"
    tally(f"children started: {min(len(started), 3)}+, told to stop: {min(len(stopped), 3)}+, parent {h.status}")
    assert all(c.requested_by == "r1" for c in children_cancelled(h.commands))
