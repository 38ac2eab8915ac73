"""Confidence on compound results and on the terminal event: parallel and map aggregate their branches'
(``confidence: min | mean | winner``, default min), choice and loop take their last step's, the run its last step's."""
from __future__ import annotations

import json
from typing import Any

import pytest

from tests.machine_helpers import Harness, machine_from


def fork(join: Any = "all", confidence: str | None = None) -> str:
    spec: dict[str, Any] = {"join": join, "branches": {n: [{"id": n, "activity": n}] for n in "abc"}}
    if confidence:
        spec["confidence"] = confidence
    return json.dumps({"name": "fork", "steps": [{"id": "p", "parallel": spec}, {"id": "after", "activity": "after", "input": {"c": "${ steps.p.confidence }"}}]})


# given an aggregate and the branches' confidences, when the join completes, then the step's confidence is
@pytest.mark.parametrize("join,confidence,script,expected", [
    ("all", None, [("a", 0.9), ("b", 0.6), ("c", 0.8)], 0.6),  # min by default
    ("all", "min", [("a", 0.9), ("b", None), ("c", 0.8)], 0.8),  # a branch without confidence does not count
    ("all", "mean", [("a", 0.9), ("b", 0.6), ("c", 0.6)], 0.7),
    ("any", "winner", [("b", 0.4)], 0.4),
    ({"n_of": 2}, "winner", [("c", 0.9), ("a", 0.5)], 0.5),  # the branch that completed the join
    ("all", "mean", [("a", None), ("b", None), ("c", None)], None),
])
def test_parallel_confidence(join, confidence, script, expected):
    h = Harness(machine_from(fork(join, confidence)))
    h.start("fork")
    for name, c in script:
        h.succeed(name, {"v": name}, confidence=c)
    assert h.state.steps["p"].confidence == pytest.approx(expected) if expected is not None else h.state.steps["p"].confidence is None
    assert h.pending_for("after").input == {"c": pytest.approx(expected) if expected is not None else None}


def test_map_confidence_is_the_mean_of_its_items():
    h = Harness(machine_from(json.dumps({"name": "m", "steps": [{"id": "m", "map": {"items": "[1, 2]", "confidence": "mean", "steps": [{"id": "item", "activity": "item"}]}}]})))
    h.start("m")
    for c in (0.5, 1.0):
        h.succeed(h.pending()[0], "ok", confidence=c)
    assert h.state.steps["m"].confidence == 0.75
    assert h.terminal().event.confidence == 0.75


def test_choice_and_loop_take_their_last_steps_confidence_and_the_run_its_last_steps():
    h = Harness(machine_from("""
    name: cl
    steps:
      - id: c
        choice:
          cases: [{when: "true", steps: [{id: one, activity: one}, {id: two, activity: two}]}]
          default: [{id: other, activity: other}]
      - id: l
        loop:
          max_iterations: 2
          steps: [{id: body, activity: body}]
    """))
    h.start("cl")
    h.succeed("one", 1, confidence=0.2)
    h.succeed("two", 2, confidence=0.7)
    assert h.state.steps["c"].confidence == 0.7
    h.succeed("body", 1, confidence=0.4)
    h.succeed("body", 2, confidence=0.8)
    assert h.state.steps["l"].confidence == 0.8
    assert h.terminal().event.confidence == 0.8


def test_a_failed_run_has_no_confidence():
    h = Harness(machine_from("""
    name: f
    steps: [{id: a, activity: a}]
    """))
    h.start("f")
    h.fail("a", "Boom", retryable=False)
    assert h.terminal().event.confidence is None


def test_a_bad_aggregate_is_refused():
    from legato.workflows.model import DefinitionError

    with pytest.raises(DefinitionError) as err:
        machine_from(fork(confidence="max"))
    assert err.value.path == "steps[0].parallel.confidence"
