"""on_error on compound steps (parallel, map, loop): the same rules as on an activity or a sub-workflow, at every
level: fail (default) | continue (output null) | {default: VALUE} | {fallback: [steps]}."""
from __future__ import annotations

import json
from typing import Any

import pytest

from legato.topics.models import ChildRunFinished, ErrorInfo
from legato.workflows import keys
from legato.workflows.machine import StartChildRun
from tests.machine_helpers import Harness, machine_from


def compound(kind: str, on_error: Any) -> str:
    """A compound step `c` of ``kind`` whose inner activity `inner` can fail, then an activity `next` reading it."""
    inner = {"id": "inner", "activity": "inner"}
    if kind == "parallel":
        step = {"id": "c", "parallel": {"branches": {"a": [inner], "b": [{"id": "other", "activity": "other"}]}}}
    elif kind == "map":
        step = {"id": "c", "map": {"items": "[1]", "steps": [inner]}}
    else:
        step = {"id": "c", "loop": {"max_iterations": 2, "steps": [inner]}}
    if on_error is not None:
        step["on_error"] = on_error
    doc = {"name": "flow", "steps": [step, {"id": "next", "activity": "next", "input": {"got": "${ steps.c.output }", "status": "${ steps.c.status }"}}]}
    return json.dumps(doc)


KINDS = ["parallel", "map", "loop"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("on_error,got", [("continue", None), ({"default": {"v": "stand-in"}}, {"v": "stand-in"})])
def test_continue_and_default_let_the_run_go_on_after_a_failed_compound_step(kind, on_error, got):
    h = Harness(machine_from(compound(kind, on_error)))
    h.start("flow")
    h.fail("inner", "Boom", retryable=False)
    assert h.state.steps["c"].status == "failed" and h.state.steps["c"].error.type == "Boom"
    assert h.state.status == "running"
    assert h.pending_for("next").input == {"got": got, "status": "failed"}


@pytest.mark.parametrize("kind", KINDS)
def test_fallback_runs_instead_of_a_failed_compound_step(kind):
    h = Harness(machine_from(compound(kind, {"fallback": [{"id": "rescue", "activity": "rescue"}]})))
    h.start("flow")
    h.fail("inner", "Boom", retryable=False)
    assert h.state.steps["c"].status == "running" and keys.fallback_frame("c") in h.state.steps["c"].children
    h.succeed("rescue", {"v": "rescued"})
    assert h.state.steps["c"].status == "succeeded" and h.state.steps["c"].output == {"v": "rescued"}
    assert h.pending_for("next").input == {"got": {"v": "rescued"}, "status": "succeeded"}


@pytest.mark.parametrize("kind", KINDS)
def test_without_on_error_a_failed_compound_step_fails_the_run(kind):
    h = Harness(machine_from(compound(kind, None)))
    h.start("flow")
    h.fail("inner", "Boom", retryable=False)
    assert h.state.status == "failed" and h.terminal().event.error.type == "Boom"


def test_a_join_timeout_follows_on_error():
    doc = {"name": "flow", "steps": [
        {"id": "c", "parallel": {"timeout": "5s", "branches": {"a": [{"id": "inner", "activity": "inner"}]}}, "on_error": {"default": "late"}},
        {"id": "next", "activity": "next", "input": {"got": "${ steps.c.output }"}},
    ]}
    h = Harness(machine_from(json.dumps(doc)))
    h.start("flow")
    h.fire(keys.join_timeout("c"))
    assert h.state.steps["c"].status == "timed_out" and h.pending_for("next").input == {"got": "late"}


def test_an_exhausted_loop_follows_on_error():
    doc = {"name": "flow", "steps": [
        {"id": "c", "loop": {"max_iterations": 1, "until": "false", "steps": [{"id": "inner", "activity": "inner"}]}, "on_error": "continue"},
        {"id": "next", "activity": "next", "input": {"status": "${ steps.c.status }"}},
    ]}
    h = Harness(machine_from(json.dumps(doc)))
    h.start("flow")
    h.succeed("inner", 1)
    assert h.state.steps["c"].error.type == "LoopExhausted" and h.pending_for("next").input == {"status": "failed"}


CHILD = """
name: child
steps:
  - id: rounds
    loop:
      max_iterations: 2
      steps:
        - id: fan
          parallel:
            branches:
              a: [{id: risky, activity: risky}]
              b: [{id: calm, activity: calm}]
          on_error: {default: {a: "stand-in"}}
"""

PARENT = """
name: parent
steps:
  - id: sub
    workflow: child
    on_error: continue
  - id: after
    activity: after
    input: {got: "${ steps.sub.output }"}
"""


def test_the_same_rules_hold_for_a_branch_inside_a_loop_inside_a_sub_workflow():
    m = machine_from(CHILD, PARENT)
    child = Harness(m, run_id="r1/sub")
    parent = Harness(m)
    [start] = [c for c in parent.start("parent") if isinstance(c, StartChildRun)]
    child.deliver(start.accepted)
    for _ in range(2):  # each round: the branch fails, the parallel's default stands in, the loop goes on
        child.fail("risky", "Boom", retryable=False)
        child.succeed("calm", "ok") if "calm" in child.pending_steps() else None
    assert child.state.status == "succeeded" and child.state.output == {"a": "stand-in"}
    out = parent.deliver(ChildRunFinished(run_id="r1", step_key="sub", child_run_id="r1/sub", status="succeeded", output=child.state.output))
    assert parent.pending_for("after").input == {"got": {"a": "stand-in"}}
    # and a failing child follows the parent's on_error (continue) in the same way
    parent2 = Harness(m, run_id="r2")
    parent2.start("parent")
    parent2.deliver(ChildRunFinished(run_id="r2", step_key="sub", child_run_id="r2/sub", status="failed", error=ErrorInfo(type="Boom", message="x")))
    assert parent2.pending_for("after").input == {"got": None}
