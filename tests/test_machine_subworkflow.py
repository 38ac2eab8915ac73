"""Given/when/then tables for sub-workflows: the parent starts a child run (StartChildRun), the child's
machine runs it and tells the parent (NotifyParent), the parent resumes. Both machines are driven together."""
from __future__ import annotations

import json
from typing import Any

import pytest

from tests.machine_helpers import Harness, compile_yaml, dump, ignored_in, requests_in, terminal_events_in
from legato.topics.models import ChildRunFinished, ErrorInfo, RunAccepted
from legato.workflows.machine import Machine, NotifyParent, StartChildRun, outstanding
from legato.workflows.model import MAX_WORKFLOW_DEPTH

CHILD = {
    "name": "child",
    "steps": [{"id": "c1", "activity": "child_work", "input": {"x": "${ input.x }"}}],
    "output": "{'child_said': steps.c1.output}",
}


def parent(on_error: Any = "fail", timeout: str | None = None, sub_input: Any = None) -> dict[str, Any]:
    sub: dict[str, Any] = {"id": "sub", "workflow": "child", "input": sub_input if sub_input is not None else {"x": "${ input.x }"}, "on_error": on_error}
    if timeout:
        sub["timeout"] = timeout
    return {"name": "parent", "steps": [sub, {"id": "after", "activity": "after", "input": {"got": "${ steps.sub.output }"}}]}


def machine(*docs: dict[str, Any]) -> Machine:
    return Machine({d["name"]: compile_yaml(json.dumps(d)) for d in docs})


def started_children(commands) -> list[RunAccepted]:
    return [c.accepted for c in commands if isinstance(c, StartChildRun)]


def notices(commands) -> list[ChildRunFinished]:
    return [c.finished for c in commands if isinstance(c, NotifyParent)]


def start_child(m: Machine, accepted: RunAccepted) -> Harness:
    child = Harness(m, run_id=accepted.run_id)
    child.deliver(accepted)
    return child


def test_a_workflow_step_starts_a_child_run_with_a_derived_id_and_its_parent():
    m = machine(parent(), CHILD)
    p = Harness(m)
    out = p.start("parent", {"x": 3}, correlation_id="corr-9")
    [acc] = started_children(out)
    assert acc.run_id == "r1/sub" and acc.workflow == "child" and acc.input == {"x": 3}
    assert acc.parent == {"run_id": "r1", "step_key": "sub", "depth": 1}
    assert acc.correlation_id == "corr-9"
    assert p.state.steps["sub"].status == "running" and p.state.steps["sub"].child_run == "r1/sub"
    assert requests_in(out) == []


@pytest.mark.parametrize("sub_input,expected", [(7, {"value": 7}), ({"a": "lit"}, {"a": "lit"})])
def test_a_non_mapping_child_input_is_wrapped(sub_input, expected):
    m = machine(parent(sub_input=sub_input), CHILD)
    [acc] = started_children(Harness(m).start("parent", {"x": 1}))
    assert acc.input == expected


def test_parent_and_child_together_the_childs_output_is_passed_on():
    m = machine(parent(), CHILD)
    p = Harness(m)
    [acc] = started_children(p.start("parent", {"x": 3}))
    child = start_child(m, acc)
    assert child.state.depth == 1 and child.state.parent["run_id"] == "r1"
    [req] = child.pending()
    assert req.request_id == "r1/sub/c1/1" and req.input == {"x": 3}
    out = child.succeed(req, "hi", cost={"usd": 0.02, "tokens_in": 10, "tokens_out": 5, "model": "m-small"})
    assert child.terminal().event.status == "succeeded"
    [notice] = notices(out)
    assert notice.run_id == "r1" and notice.step_key == "sub" and notice.child_run_id == "r1/sub"
    assert notice.status == "succeeded" and notice.output == {"child_said": "hi"}
    out = p.deliver(notice)
    assert p.state.steps["sub"].status == "succeeded" and p.state.steps["sub"].output == {"child_said": "hi"}
    assert [r.input for r in requests_in(out)] == [{"got": {"child_said": "hi"}}]
    # the child's cost is merged into the parent's
    p.succeed("after", "done", cost={"usd": 0.01, "tokens_in": 1, "tokens_out": 2, "model": "m-big"})
    cost = p.terminal().event.cost
    assert cost == {"usd": 0.03, "tokens_in": 11, "tokens_out": 7, "models": {"m-small": 0.02, "m-big": 0.01}}
    assert p.state.steps["sub"].cost["usd"] == 0.02


# given the parent's on_error, when the child fails, then the parent goes on like this
@pytest.mark.parametrize("on_error,status,after_input,error", [
    ("fail", "failed", None, "Boom"),
    ("continue", "running", {"got": None}, None),
    ({"default": "D"}, "running", {"got": "D"}, None),
])
def test_a_failed_child_follows_on_error(on_error, status, after_input, error):
    m = machine(parent(on_error), CHILD)
    p = Harness(m)
    [acc] = started_children(p.start("parent", {"x": 3}))
    child = start_child(m, acc)
    [notice] = notices(child.fail("c1", "Boom", retryable=False))
    assert notice.status == "failed" and notice.error.type == "Boom"
    out = p.deliver(notice)
    assert p.status == status
    assert p.state.steps["sub"].error.type == "Boom"
    if error:
        assert p.terminal().event.error.type == error
    else:
        assert [r.input for r in requests_in(out)] == [after_input]


def test_a_failed_child_may_fall_back():
    m = machine(parent({"fallback": [{"id": "manual", "activity": "manual"}]}), CHILD)
    p = Harness(m)
    [acc] = started_children(p.start("parent", {"x": 3}))
    [notice] = notices(start_child(m, acc).fail("c1", "Boom", retryable=False))
    p.deliver(notice)
    p.succeed("manual", "by hand")
    assert p.pending_for("after").input == {"got": "by hand"}


def test_a_child_of_an_unknown_workflow_fails_and_tells_its_parent():
    m = machine(parent(), CHILD)
    p = Harness(m)
    [acc] = started_children(p.start("parent", {"x": 3}))
    m_without_child = machine(parent())
    child = start_child(m_without_child, acc)
    [notice] = notices(child.commands)
    p.deliver(notice)
    assert p.terminal().event.error.type == "UnknownWorkflow"


# --- depth --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth,ok", [(MAX_WORKFLOW_DEPTH - 1, True), (MAX_WORKFLOW_DEPTH, True), (MAX_WORKFLOW_DEPTH + 1, False)])
def test_a_run_deeper_than_the_limit_fails_with_depth_exceeded(depth, ok):
    m = machine(CHILD)
    child = Harness(m, run_id="p/sub")
    out = child.deliver(RunAccepted(run_id="p/sub", workflow="child", input={"x": 1}, parent={"run_id": "p", "step_key": "sub", "depth": depth}))
    if ok:
        assert child.status == "running" and requests_in(out)
    else:
        assert child.terminal().event.error.type == "DepthExceeded"
        [notice] = notices(out)
        assert notice.run_id == "p" and notice.status == "failed" and notice.error.type == "DepthExceeded"


def test_a_workflow_that_starts_itself_stops_at_the_depth_limit_and_the_failure_climbs_back_up():
    rec = {"name": "rec", "steps": [{"id": "again", "workflow": "rec"}]}
    m = machine(rec)
    chain = [Harness(m)]
    out = chain[0].start("rec")
    while started_children(out):
        [acc] = started_children(out)
        chain.append(Harness(m, run_id=acc.run_id))
        out = chain[-1].deliver(acc)
    assert len(chain) == MAX_WORKFLOW_DEPTH + 2  # depths 0..MAX run, MAX+1 is refused
    assert chain[-1].state.depth == MAX_WORKFLOW_DEPTH + 1
    assert chain[-1].run_id == "r1" + "/again" * (MAX_WORKFLOW_DEPTH + 1)
    for level in range(len(chain) - 1, 0, -1):
        [notice] = notices(chain[level].commands)
        chain[level - 1].deliver(notice)
    assert all(h.terminal().event.error.type == "DepthExceeded" for h in chain)


# --- timeout, stale and duplicate notices --------------------------------------------------------------


def test_a_child_slower_than_the_steps_timeout_fails_with_child_run_timeout_and_its_late_notice_is_ignored():
    m = machine(parent(timeout="30s"), CHILD)
    p = Harness(m)
    out = p.start("parent", {"x": 3})
    [acc] = started_children(out)
    assert "sub:timeout:1" in p.state.timers
    p.fire("sub:timeout:1")
    assert p.state.steps["sub"].status == "timed_out"
    assert p.terminal().event.error.type == "ChildRunTimeout"
    [notice] = notices(start_child(m, acc).succeed("c1", "late"))
    snapshot = dump(p.state)
    assert [c.reason for c in p.deliver(notice)] == ["run_finished"]
    assert dump(p.state) == snapshot


def test_a_child_timeout_with_on_error_continue_goes_on_and_then_ignores_the_late_notice():
    m = machine(parent("continue", timeout="30s"), CHILD)
    p = Harness(m)
    [acc] = started_children(p.start("parent", {"x": 3}))
    out = p.fire("sub:timeout:1")
    assert p.state.steps["sub"].error.type == "ChildRunTimeout"
    assert [r.input for r in requests_in(out)] == [{"got": None}]
    [notice] = notices(start_child(m, acc).succeed("c1", "late"))
    snapshot = dump(p.state)
    [ignored] = ignored_in(p.deliver(notice))
    assert ignored.reason == "stale_child" and dump(p.state) == snapshot


def test_a_notice_in_time_clears_the_step_timeout():
    m = machine(parent(timeout="30s"), CHILD)
    p = Harness(m)
    [acc] = started_children(p.start("parent", {"x": 3}))
    [notice] = notices(start_child(m, acc).succeed("c1", "ok"))
    p.deliver(notice)
    assert "sub:timeout:1" not in p.state.timers
    assert ignored_in(p.fire("sub:timeout:1", now=p.now + 30_000))[0].reason == "stale_timer"


@pytest.mark.parametrize("tamper", [
    {},  # the very notice again
    {"child_run_id": "r1/other"},
    {"step_key": "after"},
    {"step_key": "nope"},
])
def test_a_duplicate_or_stale_notice_is_ignored_and_changes_nothing(tamper):
    m = machine(parent(), CHILD)
    p = Harness(m)
    [acc] = started_children(p.start("parent", {"x": 3}))
    [notice] = notices(start_child(m, acc).succeed("c1", "ok"))
    if tamper:
        bogus = notice.model_copy(update=tamper)
        snapshot = dump(p.state)
        assert [c.reason for c in p.deliver(bogus)] == ["stale_child"]
        assert dump(p.state) == snapshot and p.state.steps["sub"].status == "running"
    p.deliver(notice)
    snapshot = dump(p.state)
    assert [c.reason for c in p.deliver(notice)] == ["stale_child"]
    assert dump(p.state) == snapshot


def test_outstanding_reissues_a_running_child_run():
    m = machine(parent(), CHILD)
    p = Harness(m)
    [acc] = started_children(p.start("parent", {"x": 3}))
    assert started_children(outstanding(p.state)) == [acc]
    # a re-delivered start of the child is a duplicate for the child
    child = start_child(m, acc)
    assert [c.reason for c in child.deliver(acc)] == ["duplicate_trigger"]


def test_a_finished_child_reissues_its_notice_on_outstanding():
    m = machine(parent(), CHILD)
    p = Harness(m)
    [acc] = started_children(p.start("parent", {"x": 3}))
    child = start_child(m, acc)
    [notice] = notices(child.succeed("c1", "ok"))
    assert notices(outstanding(child.state)) == [notice]


# --- sub-workflows inside map and loop --------------------------------------------------------------------


def test_one_child_run_per_map_item_and_their_outputs_in_item_order():
    doc = {"name": "fan", "steps": [{"id": "m", "map": {"items": "input.xs", "max_concurrency": 2,
                                                       "steps": [{"id": "sub", "workflow": "child", "input": {"x": "${ item }"}}]}}]}
    m = machine(doc, CHILD)
    p = Harness(m)
    out = p.start("fan", {"xs": [10, 20, 30]})
    accs = started_children(out)
    assert [a.run_id for a in accs] == ["r1/m[0]/sub", "r1/m[1]/sub"]
    assert [a.parent["step_key"] for a in accs] == ["m[0]/sub", "m[1]/sub"]
    pending = {a.run_id: a for a in accs}
    while pending:
        run_id = sorted(pending)[-1]
        acc = pending.pop(run_id)
        [notice] = notices(start_child(m, acc).succeed("c1", acc.input["x"] + 1))
        for more in started_children(p.deliver(notice)):
            pending[more.run_id] = more
    assert p.terminal().event.output == [{"child_said": 11}, {"child_said": 21}, {"child_said": 31}]


def test_a_child_run_per_loop_iteration():
    doc = {"name": "again", "steps": [{"id": "l", "loop": {"max_iterations": 3, "until": "steps.sub.output.child_said == 'stop'",
                                                          "steps": [{"id": "sub", "workflow": "child", "input": {"x": "${ iteration }"}}]}}]}
    m = machine(doc, CHILD)
    p = Harness(m)
    out = p.start("again")
    seen = []
    for answer in ("go", "stop"):
        [acc] = started_children(out)
        seen.append((acc.run_id, acc.input))
        [notice] = notices(start_child(m, acc).succeed("c1", answer))
        out = p.deliver(notice)
    assert seen == [("r1/l#0/sub", {"x": 0}), ("r1/l#1/sub", {"x": 1})]
    assert p.terminal().event.output == {"child_said": "stop"}


def test_a_child_run_in_a_lost_parallel_branch_is_ignored_when_it_finishes():
    doc = {"name": "race", "steps": [{"id": "p", "parallel": {"join": "any", "branches": {
        "quick": [{"id": "quick", "activity": "quick"}],
        "slow": [{"id": "sub", "workflow": "child", "input": {"x": 1}}]}}}, {"id": "after", "activity": "after"}]}
    m = machine(doc, CHILD)
    p = Harness(m)
    [acc] = started_children(p.start("race"))
    p.succeed("quick", "q")
    assert p.state.steps["p/slow/sub"].status == "cancelled"
    [notice] = notices(start_child(m, acc).succeed("c1", "late"))
    snapshot = dump(p.state)
    assert [c.reason for c in p.deliver(notice)] == ["stale_child"]
    assert dump(p.state) == snapshot


# --- notices that arrive while a fallback runs ------------------------------------------------------------


def test_fixed_a_duplicate_failed_notice_during_the_fallback_is_applied_again():
    """BUG (machine.py ``on_child_finished``: a step is "running" again while its fallback runs, and the notice's
    child_run still matches): a redelivered ChildRunFinished(failed) is not ignored.
    Input: parent [sub: workflow child, on_error {fallback: [manual]}]; the child fails; its notice is
    delivered twice (the coordinator topic is at-least-once).
    Expected: the second delivery is EventIgnored (stale_child / duplicate) and the state is unchanged.
    Actual: the fallback is started again: a second RequestActivity r1/sub/fallback/manual/1 and StartTimer
    are emitted and step sub has children ['sub/fallback', 'sub/fallback']."""
    m = machine(parent({"fallback": [{"id": "manual", "activity": "manual"}]}), CHILD)
    p = Harness(m)
    [acc] = started_children(p.start("parent", {"x": 3}))
    [notice] = notices(start_child(m, acc).fail("c1", "Boom", retryable=False))
    p.deliver(notice)
    snapshot = dump(p.state)
    out = p.deliver(notice)
    assert [c.reason for c in ignored_in(out)] == ["stale_child"] and len(out) == 1
    assert dump(p.state) == snapshot


def test_fixed_a_late_notice_after_a_child_timeout_overrides_the_running_fallback():
    """BUG (same place): after ChildRunTimeout the step's fallback runs and the step is "running" again, so the
    timed-out child's late ChildRunFinished is taken as the step's result.
    Input: parent [sub: workflow child, timeout 30s, on_error {fallback: [manual]}, after]; the timeout fires,
    then the child succeeds with "late".
    Expected: the late notice is ignored; the step's output will be the fallback's (manual's) output.
    Actual: sub succeeds with {'child_said': 'late'}, `after` is requested, and the fallback's request
    r1/sub/fallback/manual/1 is left pending in an abandoned frame."""
    m = machine(parent({"fallback": [{"id": "manual", "activity": "manual"}]}, timeout="30s"), CHILD)
    p = Harness(m)
    [acc] = started_children(p.start("parent", {"x": 3}))
    p.fire("sub:timeout:1")
    assert p.pending_steps() == ["manual"]
    [notice] = notices(start_child(m, acc).succeed("c1", "late"))
    out = p.deliver(notice)
    assert [c.reason for c in ignored_in(out)] == ["stale_child"]
    assert p.pending_steps() == ["manual"]
    p.succeed("manual", "by hand")
    assert p.pending_for("after").input == {"got": "by hand"}
