"""Rolling upgrades: a coordinator reads the run states its predecessor stored in the changelog.

``tests/run_states/v0.1.0-*.json`` are run-state documents as v0.1.0 stores them (``RunState.encoded()``), written
by ``python -m tests.test_run_state_compat`` at different points of a run's life. Each must decode with the current
code and carry on: a pending request answered, or a finished run still finished. A change of the stored format that
breaks one of these needs a migration (docs/deploy.md, "Rolling upgrades of Legato"), not a new file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from legato.workflows.state import RunState
from legato.workflows.machine import Machine
from tests.machine_helpers import Harness, example, ignored_in

STATES = Path(__file__).parent / "run_states"
WORKFLOW = "due_diligence"


def _snapshots() -> dict[str, RunState]:
    """A due_diligence run: just started, with one answer in, and finished."""
    h = Harness(Machine({WORKFLOW: example(WORKFLOW)}), run_id="compat-run")
    out = {}
    h.start(WORKFLOW, {"name": "Grace", "credit_score": 800, "references": ["Aiken"]}, now=1_000)
    out["started"] = h.state
    h.succeed(h.pending()[0], {"ok": True}, now=2_000)
    out["running"] = h.state
    t = 3_000
    while h.pending() and t < 100_000:
        h.succeed(h.pending()[0], {"ok": True, "score": 0.9, "summary": "x"}, now=t)
        t += 1_000
    out["finished"] = h.state
    return out


@pytest.mark.parametrize("path", sorted(STATES.glob("v0.1.0-*.json")), ids=lambda p: p.stem)
def test_a_stored_run_state_of_the_previous_version_decodes_and_reencodes_the_same(path: Path):
    raw = path.read_bytes().strip()
    state = RunState.model_validate_json(raw)
    assert state.run_id == "compat-run"
    assert RunState.model_validate_json(state.encoded()) == state


def test_a_run_stored_by_the_previous_version_carries_on():
    """The current machine takes the stored running run over: an answer to one of its pending requests is taken."""
    h = Harness(Machine({WORKFLOW: example(WORKFLOW)}), run_id="compat-run")
    h.state = RunState.model_validate_json((STATES / "v0.1.0-running.json").read_bytes().strip())
    pending = h.pending()
    assert pending, "the stored running run waits on requests"
    commands = h.succeed(pending[0], {"ok": True}, now=5_000)
    assert not ignored_in(commands)
    assert pending[0].request_id not in [r.request_id for r in h.pending()]


def test_every_snapshot_is_there():
    assert sorted(p.stem for p in STATES.glob("v0.1.0-*.json")) == ["v0.1.0-finished", "v0.1.0-running", "v0.1.0-started"]


if __name__ == "__main__":
    for name, state in _snapshots().items():
        (STATES / f"v0.1.0-{name}.json").write_bytes(state.encoded() + b"\n")
        print(name, state.status if hasattr(state, "status") else "", file=sys.stderr)
