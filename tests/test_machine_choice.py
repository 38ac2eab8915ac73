"""Given/when/then tables for choice steps: cases, routes, default, recorded path, failing conditions."""
from __future__ import annotations

import pytest

from tests.machine_helpers import Harness, machine_from, requests_in, terminal_events_in

CASES = """
name: cases
steps:
  - id: pick
    choice:
      cases:
        - when: "input.n > 10"
          steps: [{id: big, activity: w}]
        - when: "input.n > 5"
          steps: [{id: medium, activity: w}]
        - when: "input.n > 0"
          steps: [{id: small, activity: w}, {id: small2, activity: w}]
      default:
        - id: other
          activity: w
  - id: after
    activity: w
    input: {picked: "${ steps.pick.output }"}
"""

ROUTES = """
name: routes
steps:
  - id: pick
    choice:
      route: "input.kind"
      routes:
        billing: [{id: bill, activity: w}]
        tech: [{id: tech, activity: w}]
      default: [{id: human, activity: w}]
"""

# given input n, when the choice is reached, then the first matching case (in order) wins, else default
CASE_TABLE = [
    (11, "case0", "big"),  # matches all three: the first wins
    (100, "case0", "big"),
    (10, "case1", "medium"),
    (6, "case1", "medium"),
    (5, "case2", "small"),
    (1, "case2", "small"),
    (0, "default", "other"),
    (-3, "default", "other"),
]


@pytest.mark.parametrize("n,path,first", CASE_TABLE)
def test_the_first_matching_case_wins_else_default(n, path, first):
    h = Harness(machine_from(CASES))
    out = h.start("cases", {"n": n})
    assert [r.step_id for r in requests_in(out)] == [first]
    assert h.state.steps["pick"].path == path
    assert h.state.path == [f"pick:{path}"]
    assert h.pending()[0].request_id == f"r1/pick/{path}/{first}/1"


def test_the_choice_output_is_the_last_step_of_the_taken_path():
    h = Harness(machine_from(CASES))
    h.start("cases", {"n": 1})
    h.succeed("small", "s1")
    out = h.succeed("small2", "s2")
    assert [(r.step_id, r.input) for r in requests_in(out)] == [("after", {"picked": "s2"})]
    h.succeed("after", "done")
    end = h.terminal().event
    assert end.output == "done" and end.path == ["pick:case2"]
    assert h.state.steps["pick"].status == "succeeded"


# given a route expression, when it names a declared route it is taken, otherwise default
ROUTE_TABLE = [
    ({"kind": "billing"}, "route:billing", "bill"),
    ({"kind": "tech"}, "route:tech", "tech"),
    ({"kind": "sales"}, "default(sales)", "human"),  # undeclared route: default, with the name it gave
    ({"kind": "Billing"}, "default(Billing)", "human"),  # names are exact
    ({"kind": 3}, "default", "human"),  # not a string
    ({"kind": None}, "default", "human"),
]


@pytest.mark.parametrize("run_input,path,first", ROUTE_TABLE)
def test_route_takes_the_named_route_or_default(run_input, path, first):
    h = Harness(machine_from(ROUTES))
    out = h.start("routes", run_input)
    assert [r.step_id for r in requests_in(out)] == [first]
    assert h.state.path == [f"pick:{path}"]
    h.succeed(first, "ok")
    assert h.terminal().event.path == [f"pick:{path}"]
    assert h.terminal().event.output == "ok"


def test_a_long_undeclared_route_name_is_recorded_shortened():
    h = Harness(machine_from(ROUTES))
    h.start("routes", {"kind": "x" * 500})
    assert h.state.path == ["pick:default(" + "x" * 100 + "…)"]
    assert h.state.steps["pick"].path == "default"


def test_every_choice_taken_is_recorded_in_order_on_the_state_and_the_terminal_event():
    wf = """
name: paths
steps:
  - id: first
    choice:
      route: "input.kind"
      routes:
        a: [{id: one, activity: w}]
      default: [{id: dflt, activity: w}]
  - id: second
    choice:
      cases:
        - when: "steps.one.output > 1"
          steps:
            - id: inner
              choice:
                cases: [{when: "true", steps: [{id: two, activity: w}]}]
                default: [{id: never, activity: w}]
      default: [{id: three, activity: w}]
"""
    h = Harness(machine_from(wf))
    h.start("paths", {"kind": "a"})
    h.succeed("one", 2)
    assert h.state.path == ["first:route:a", "second:case0", "inner:case0"]
    h.succeed("two", "end")
    assert h.terminal().event.path == ["first:route:a", "second:case0", "inner:case0"]


# given a condition that cannot be evaluated to a bool, when the choice is reached, then the run fails
BAD_WHENS = [
    "input.missing > 1",  # no such key
    "input.n / 0 > 1",  # division by zero
    "input.n",  # not a bool
    "'yes'",
]


@pytest.mark.parametrize("when", BAD_WHENS)
def test_a_when_that_errors_fails_the_run_with_expression_error(when):
    wf = f"""
name: bad
steps:
  - id: pick
    choice:
      cases: [{{when: "{when}", steps: [{{id: a, activity: w}}]}}]
      default: [{{id: b, activity: w}}]
"""
    h = Harness(machine_from(wf))
    out = h.start("bad", {"n": 1})
    assert requests_in(out) == []
    [end] = terminal_events_in(out)
    assert end.event.type == "run.failed"
    assert end.event.error.type == "ExpressionError" and "pick" in end.event.error.message
    assert h.state.steps["pick"].status == "failed" and h.state.path == []


def test_a_route_expression_that_errors_fails_the_run():
    h = Harness(machine_from(ROUTES.replace('"input.kind"', '"input.nope.deeper"')))
    h.start("routes", {})
    assert h.terminal().event.error.type == "ExpressionError"


def test_a_when_reading_a_later_failed_condition_stops_before_the_default():
    # a later case that would error is never evaluated once an earlier one matched
    wf = """
name: lazy
steps:
  - id: pick
    choice:
      cases:
        - when: "input.n == 1"
          steps: [{id: a, activity: w}]
        - when: "input.missing == 1"
          steps: [{id: b, activity: w}]
      default: [{id: c, activity: w}]
"""
    h = Harness(machine_from(wf))
    assert [r.step_id for r in requests_in(h.start("lazy", {"n": 1}))] == ["a"]
    h2 = Harness(machine_from(wf))
    h2.start("lazy", {"n": 2})
    assert h2.terminal().event.error.type == "ExpressionError"


def test_a_failure_inside_the_taken_path_fails_the_choice():
    h = Harness(machine_from(CASES))
    h.start("cases", {"n": 20})
    h.fail("big", "Nope", retryable=False)
    assert h.state.steps["pick"].status == "failed"
    assert h.terminal().event.error.type == "Nope"
    assert h.terminal().event.path == ["pick:case0"]
