"""Given/when/then tables for parallel steps: fork, join, output by branch, failure and cancellation."""
from __future__ import annotations

import itertools

import pytest

from tests.machine_helpers import Harness, dump, ignored_in, machine_from, requests_in, succeeded, terminal_events_in

FORK = """
name: fork
steps:
  - id: p
    parallel:
      branches:
        left:
          - id: l1
            activity: left_work
            input: {n: "${ input.n }"}
          - id: l2
            activity: left_more
            input: {prev: "${ steps.l1.output }"}
        middle:
          - id: m
            activity: middle_work
        right:
          - id: r
            activity: right_work
            retry: {max_attempts: 2, backoff: 1s}
  - id: after
    activity: join_work
    input: {all: "${ steps.p.output }"}
"""


def started() -> Harness:
    h = Harness(machine_from(FORK))
    h.start("fork", {"n": 1})
    return h


def test_all_branches_are_requested_in_the_same_decision():
    h = Harness(machine_from(FORK))
    out = h.start("fork", {"n": 1})
    assert [r.step_id for r in requests_in(out)] == ["l1", "m", "r"]
    assert [r.request_id for r in requests_in(out)] == ["r1/p/left/l1/1", "r1/p/middle/m/1", "r1/p/right/r/1"]
    assert h.state.steps["p"].status == "running"
    assert h.state.steps["p"].children == ["p/left", "p/middle", "p/right"]


def test_a_branch_runs_its_steps_in_sequence():
    h = started()
    out = h.succeed("l1", {"v": 1})
    assert [(r.step_id, r.input) for r in requests_in(out)] == [("l2", {"prev": {"v": 1}})]
    assert h.state.steps["p"].status == "running"


# when the branches finish in any order, then the join fires once, after the last, with the same output
ORDERS = list(itertools.permutations(["l1", "l2", "m", "r"]))
ORDERS = [o for o in ORDERS if o.index("l1") < o.index("l2")]


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_join_waits_for_every_branch_and_outputs_a_map_by_branch_name(order):
    h = started()
    outputs = {"l1": "one", "l2": "two", "m": "mid", "r": "right"}
    for i, step_id in enumerate(order):
        out = h.succeed(step_id, outputs[step_id])
        later = [r.step_id for r in requests_in(out) if r.step_id == "after"]
        if i < len(order) - 1:
            assert later == [] and h.state.steps["p"].status == "running"
        else:
            assert later == ["after"]
    expected = {"left": "two", "middle": "mid", "right": "right"}
    assert h.state.steps["p"].output == expected
    assert h.pending_for("after").input == {"all": expected}
    h.succeed("after", "joined")
    assert h.terminal().event.output == "joined"


def test_a_retry_inside_one_branch_does_not_disturb_the_others():
    h = started()
    h.fail("r", "Flaky", retryable=True)
    assert h.state.steps["p/right/r"].status == "waiting_retry"
    h.succeed("m", 1)
    h.fire("p/right/r:retry:1")
    h.succeed("r", 2)
    h.succeed("l1", 3)
    out = h.succeed("l2", 4)
    assert [r.step_id for r in requests_in(out)] == ["after"]
    assert h.state.steps["p"].output == {"left": 4, "middle": 1, "right": 2}


# given several branches in flight, when one fails for good, then the step fails and the others are cancelled
FAILURES = [
    ("m", lambda h: h.fail("m", "Broken", retryable=False), "Broken"),
    ("l2", lambda h: h.fail("l2", "Broken", retryable=False), "Broken"),
    ("r", lambda h: (h.fail("r", "Flaky"), h.fire("p/right/r:retry:1"), h.fail("r", "Again")), "Again"),
    ("m-timeout", lambda h: h.fire("p/middle/m:timeout:1"), "ActivityTimeout"),
]


@pytest.mark.parametrize("name,fail,error_type", FAILURES, ids=[f[0] for f in FAILURES])
def test_a_failing_branch_fails_the_step_and_cancels_the_others(name, fail, error_type):
    h = started()
    h.succeed("l1", "x")  # left is now at l2
    in_flight = {r.step_id: r for r in h.pending()}
    fail(h)
    assert h.status == "failed"
    assert h.state.steps["p"].status == "failed" and h.state.steps["p"].error.type == error_type
    assert h.terminal().event.error.type == error_type
    assert h.state.requests == {} and set(h.state.timers) == {"run:retention"}
    assert "after" not in h.state.steps
    # late completions of the cancelled branches are refused and change nothing
    before = dump(h.state)
    for req in in_flight.values():
        out = h.deliver(succeeded(req, "late"))
        assert len(out) == 1 and ignored_in(out)
    assert dump(h.state) == before
    assert len(terminal_events_in(h.commands)) == 1


def test_cancelled_siblings_are_marked_cancelled_when_the_run_goes_on():
    # a parallel step failing always fails its run (no catch construct), so check the step-level bookkeeping
    wf = """
name: cancel
steps:
  - id: p
    parallel:
      branches:
        a: [{id: a, activity: x}]
        b: [{id: b, activity: x}]
        c: [{id: c, activity: x, retry: {max_attempts: 3}}]
"""
    h = Harness(machine_from(wf))
    h.start("cancel")
    h.fail("c", "Retry")  # c waits for a retry
    h.fail("a", "Fatal", retryable=False)
    statuses = {k: s.status for k, s in h.state.steps.items()}
    assert statuses == {"p": "failed", "p/a/a": "failed", "p/b/b": "cancelled", "p/c/c": "cancelled"}
    assert h.state.frames["p/b"].status == "cancelled"


def test_nested_compound_steps_inside_branches():
    wf = """
name: nested
steps:
  - id: outer
    parallel:
      branches:
        deep:
          - id: inner
            parallel:
              branches:
                x: [{id: x, activity: w}]
                y: [{id: y, activity: w}, {id: y2, activity: w, input: {prev: "${ steps.y.output }"}}]
          - id: pick
            choice:
              cases:
                - when: "steps.inner.output.x > 1"
                  steps: [{id: big, activity: w}]
              default: [{id: small, activity: w}]
        flat:
          - id: f
            activity: w
"""
    h = Harness(machine_from(wf))
    out = h.start("nested")
    assert sorted(r.step_id for r in requests_in(out)) == ["f", "x", "y"]
    h.succeed("y", 1)
    h.succeed("y2", 2)
    out = h.succeed("x", 5)
    assert [r.step_id for r in requests_in(out)] == ["big"]
    assert h.state.steps["outer/deep/inner"].output == {"x": 5, "y": 2}
    h.succeed("big", "B")
    assert h.status == "running"
    h.succeed("f", "F")
    assert h.terminal().event.output == {"deep": "B", "flat": "F"}
    assert h.state.path == ["pick:case0"]


def test_a_branch_that_ends_the_run_cancels_its_siblings():
    wf = """
name: early
steps:
  - id: p
    parallel:
      branches:
        quick: [{id: stop, end: {output: "'early'"}}]
        slow: [{id: s, activity: w}]
"""
    h = Harness(machine_from(wf))
    out = h.start("early")
    [end] = terminal_events_in(out)
    assert end.event.output == "early" and end.event.status == "succeeded"
    assert h.state.requests == {} and set(h.state.timers) == {"run:retention"}
    assert len(terminal_events_in(h.commands)) == 1
