"""The engine's shape: step statuses change only through transitions.py (a table of allowed moves), ids are built
and parsed in keys.py, and the stored run state carries a schema version."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest

from legato.workflows import keys
from legato.workflows.context import Run
from legato.workflows.state import SCHEMA_VERSION, STEP_FINISHED, Frame, RunState, StepState, StepStatus
from legato.workflows.steps import _PROCESSORS
from legato.workflows.model import _STEP_KINDS
from legato.workflows.transitions import ALLOWED, IllegalTransition, StepFinished, move
from tests.machine_helpers import T0, Harness, machine_from

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


def test_every_status_has_a_row_and_a_finished_step_never_moves():
    assert set(ALLOWED) == set(get_args(StepStatus))
    for status in STEP_FINISHED:
        assert ALLOWED[status] == frozenset()


def _run() -> Run:
    state = RunState(run_id="r", workflow="w", version=1, started_ms=T0, frames={"root": Frame(id="root", ref="root")})
    return Run(state, None, T0 + 5)


@pytest.mark.parametrize("start,to", [("succeeded", "running"), ("failed", "succeeded"), ("cancelled", "cancelled"), ("waiting", "waiting_retry"), ("waiting_retry", "succeeded")])
def test_a_refused_transition_raises(start, to):
    run = _run()
    step = StepState(key="a", step_id="a", kind="activity", frame="root", status=start)
    with pytest.raises(IllegalTransition, match=f"from {start} to {to}"):
        move(run, step, to)
    assert step.status == start and run.events == []


def test_a_final_move_stamps_shows_and_emits_the_step():
    run = _run()
    step = StepState(key="a", step_id="a", kind="activity", frame="root", started_ms=T0, output=1)
    move(run, step, "succeeded")
    assert step.finished_ms == T0 + 5 and run.state.view["a"]["status"] == "succeeded"
    [event] = run.events
    assert isinstance(event, StepFinished) and (event.status, event.previous, event.finished_ms) == ("succeeded", "running", T0 + 5)


def test_only_transitions_assigns_a_step_status():
    """A step's ``.status`` is assigned in transitions.py only (frames and the run have statuses of their own)."""
    offenders = []
    for path in sorted(WORKFLOWS.rglob("*.py")):
        if path.name == "transitions.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
            for target in targets:
                for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(t, ast.Attribute) and t.attr == "status":
                        owner = ast.unparse(t.value)
                        if not (owner.endswith("state") or owner.endswith("frame")):
                            offenders.append(f"{path.name}:{node.lineno} {ast.unparse(t)}")
    assert offenders == []


def test_every_step_kind_has_a_processor():
    assert set(_PROCESSORS) == set(_STEP_KINDS)


# --- keys -------------------------------------------------------------------------------------------


def test_request_ids_round_trip_and_foreign_ids_are_refused():
    rid = keys.request_id("run/1", "loop#2/p/b~2/a", 3)
    assert keys.parse_request_id("run/1", rid) == ("loop#2/p/b~2/a", 3)
    assert keys.parse_request_id("run/2", rid) is None
    assert keys.parse_request_id("run/1", "run/1/a/x") is None


def test_timer_pending_finds_a_timer_in_stored_bytes_and_nothing_else():
    h = Harness(machine_from("""
    name: t
    steps: [{id: a, activity: a, timeout: 5s}]
    """))
    h.start("t")
    raw = h.state.model_dump_json(exclude_defaults=True).encode()
    assert keys.timer_pending(raw, keys.attempt_timeout("a", 1))
    assert not keys.timer_pending(raw, keys.attempt_timeout("a", 2)) and not keys.timer_pending(raw, "a")


def test_step_and_frame_keys():
    assert keys.step_key("root", "a") == "a" and keys.step_key("p/b", "a") == "p/b/a"
    assert keys.branch_of(keys.rerun_frame(keys.branch_frame("p", "b"), 2)) == "p/b"
    assert keys.is_transient(keys.iteration_frame("l", 1)) and keys.is_transient(keys.item_frame("m", 0)) and not keys.is_transient("p/b/a")


# --- schema version ---------------------------------------------------------------------------------


def test_a_new_run_is_stored_with_the_current_schema_version():
    h = Harness(machine_from("""
    name: t
    steps: [{id: a, activity: a}]
    """))
    h.start("t")
    stored = h.state.model_dump_json(exclude_defaults=True)
    assert f'"schema_version":{SCHEMA_VERSION}' in stored
    assert RunState.model_validate_json(stored).schema_version == SCHEMA_VERSION


def test_a_state_stored_without_a_schema_version_reads_as_version_1():
    old = '{"run_id":"r","workflow":"w","version":1,"started_ms":1,"steps":{"a":{"key":"a","step_id":"a","kind":"activity","frame":"root"}}}'
    state = RunState.model_validate_json(old)
    assert state.schema_version == 1 and state.steps["a"].status == "running" and state.signals == []


def test_a_state_from_a_newer_engine_is_refused():
    with pytest.raises(ValueError, match="newer"):
        RunState.model_validate({"schema_version": SCHEMA_VERSION + 1, "run_id": "r", "workflow": "w", "version": 1, "started_ms": 1})
