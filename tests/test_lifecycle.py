"""The pure lifecycle decisions (workflows/lifecycle.py): the redrive guard, what a fork copies, retention.

Source runs are made by the real state machine, so the tests see the states it actually stores.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.machine_helpers import Harness, machine_from
from legato.topics.models import RunForkRequested
from legato.workflows.catalog import Definition, source_sha256
from legato.workflows.lifecycle import DEFAULT_RETENTION_S, fork_seed, redrive_refusal, retention_ms
from legato.workflows.model import DefinitionError, load_source

THREE = """
name: three
version: 2
retention: 2s
steps:
  - {id: a, activity: act_a, input: {x: "${ input.x }"}}
  - id: p
    parallel:
      branches:
        left: [{id: l, activity: act_l}]
        right: [{id: r, activity: act_r}]
  - {id: c, activity: act_c, on_error: continue}
  - {id: d, activity: act_d}
"""


def _definition(text: str = THREE) -> Definition:
    source = textwrap.dedent(text)
    return Definition(load_source(source), source_sha256(source), "2026-01-01T00:00:00.000Z")


def _run(until: str) -> Harness:
    """A run of THREE driven until step ``until`` is pending (or failed, for ``d``)."""
    h = Harness(machine_from(THREE))
    h.start("three", {"x": 1})
    h.succeed("a", {"a": 1}, cost={"usd": 0.5, "tokens_in": 10})
    if until == "p":
        return h
    h.succeed("l", "L", cost={"usd": 0.25})
    h.succeed("r", "R")
    if until == "c":
        return h
    h.fail("c", retryable=False)  # on_error: continue
    if until == "d":
        return h
    h.fail("d", retryable=False)
    return h


def _fork(h: Harness, step: str, **kw) -> object:
    return fork_seed(h.state, _definition(), RunForkRequested(run_id=h.run_id, from_step=step, new_run_id="f1", **kw))


# --- redrive -------------------------------------------------------------------------------------------


def test_only_a_failed_top_level_run_that_started_can_be_redriven():
    failed = _run("failed")
    assert failed.status == "failed" and redrive_refusal(failed.state) is None
    assert "unknown run" in redrive_refusal(None)
    assert redrive_refusal(_run("p").state) == "the run is running: only a failed run can be redriven"
    child = failed.state.model_copy(update={"parent": {"run_id": "parent", "step_key": "s"}})
    assert "redrive its parent" in redrive_refusal(child)
    unknown = Harness(machine_from(THREE))
    unknown.start("nope")
    assert unknown.status == "failed"
    assert redrive_refusal(unknown.state) == "the run never started a step (UnknownWorkflow): trigger it again"
    spent = failed.state.model_copy(update={"error": failed.state.error.model_copy(update={"type": "budget_exceeded"})})
    assert "spent its budget" in redrive_refusal(spent)


# --- fork ----------------------------------------------------------------------------------------------


def test_fork_copies_the_steps_before_the_fork_point_with_nested_steps_and_cost():
    seed = _fork(_run("failed"), "d", input={"x": 2})
    assert seed.run_id == "f1" and seed.workflow == "three" and seed.version == 2 and seed.sha256 == _definition().sha256
    assert seed.forked_from == {"run_id": "r1", "step": "d"} and seed.input == {"x": 2}
    assert [(s.step_id, s.status) for s in seed.steps] == [("a", "succeeded"), ("p", "succeeded"), ("l", "succeeded"), ("r", "succeeded"), ("c", "failed")]
    by_id = {s.step_id: s for s in seed.steps}
    assert by_id["a"].output == {"a": 1} and by_id["a"].cost == {"usd": 0.5, "tokens_in": 10}
    assert by_id["p"].output == {"left": "L", "right": "R"} and by_id["p"].cost == {"usd": 0.25}
    assert by_id["l"].cost is None  # counted once, in its top-level step


def test_fork_keeps_the_source_input_and_correlation_unless_given():
    seed = _fork(_run("failed"), "p")
    assert seed.input == {"x": 1} and [s.step_id for s in seed.steps] == ["a"]
    assert _fork(_run("failed"), "a").steps == []


def test_fork_from_a_running_run_copies_what_finished():
    seed = _fork(_run("c"), "c")
    assert [s.step_id for s in seed.steps] == ["a", "p", "l", "r"]


@pytest.mark.parametrize(
    "until, step, reason",
    [
        ("failed", "l", "'l' is a nested step of three@2: fork from one of its top-level steps (a, p, c, d)"),
        ("failed", "zz", "'zz' is no step of three@2"),
        ("p", "c", "step 'p' did not finish in run r1 (running): fork from it or an earlier step"),
        ("d", "e_missing", "is no step"),
    ],
)
def test_fork_refusals_say_why(until, step, reason):
    got = _fork(_run(until), step)
    assert isinstance(got, str) and reason in got


def test_a_failed_step_that_stopped_the_run_cannot_be_forked_past():
    text = THREE.replace("on_error: continue", "on_error: fail").replace("- {id: d, activity: act_d}", "- {id: d, activity: act_d}\n  - {id: e, activity: act_e}")
    h = Harness(machine_from(text))
    h.start("three", {"x": 1})
    h.succeed("a", 1)
    h.succeed("l", 1)
    h.succeed("r", 1)
    h.fail("c", retryable=False)
    assert h.status == "failed"
    got = fork_seed(h.state, _definition(text), RunForkRequested(run_id="r1", from_step="d", new_run_id="f1"))
    assert got == "step 'c' did not finish in run r1 (failed): fork from it or an earlier step"


# --- retention and the language ------------------------------------------------------------------------


def test_retention_comes_from_the_workflow_else_the_default():
    assert retention_ms(_definition().workflow) == 2000
    plain = _definition(THREE.replace("retention: 2s\n", ""))
    assert retention_ms(plain.workflow) == round(DEFAULT_RETENTION_S * 1000)
    assert retention_ms(plain.workflow, default_s=60) == 60_000
    assert retention_ms(_definition(THREE.replace("2s", "7d")).workflow) == 7 * 86_400_000


def test_a_workflow_step_may_pin_its_child_version():
    wf = load_source("name: parent\nsteps:\n  - {id: s, workflow: child, version: 3}\n")
    assert wf.steps["s"].version == 3 and wf.children == {"child"}
    with pytest.raises(DefinitionError, match="steps\\[0\\].version"):
        load_source("name: parent\nsteps:\n  - {id: s, workflow: child, version: 0}\n")


# --- the documentation ----------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_docs_document_the_lifecycle_where_a_reader_looks_for_it():
    """Issue 11's names in the pages a user reads: the workflow language has ``retention`` and a ``workflow:``
    step's ``version``, the client shows ``version=``, ``redrive`` and ``fork``, and the guarantee is one terminal
    event per run and per redrive."""
    language = (DOCS / "language" / "index.md").read_text(encoding="utf-8")
    assert "\nretention: " in language, "the example YAML has no workflow-level retention"
    assert "`retention`" in language.split("Workflow-level:")[1].split("\n\n")[0], "the workflow-level keys do not name retention"
    workflow_row = next(line for line in language.splitlines() if line.startswith("| `workflow` |"))
    assert "`version`" in workflow_row, workflow_row
    reference = (DOCS / "language" / "reference.md").read_text(encoding="utf-8")
    assert "| `retention` | duration |" in reference and "| `version` | integer ≥ 1 | the highest deployed" in reference
    contract = (DOCS / "concepts" / "topics.md").read_text(encoding="utf-8")
    for call in ("version=", "legato.redrive(", "legato.fork("):
        assert call in contract, f"the LegatoClient example does not show {call}"
    guarantees = (DOCS / "concepts" / "guarantees.md").read_text(encoding="utf-8")
    assert "one terminal event per run and per redrive" in " ".join(guarantees.split())
