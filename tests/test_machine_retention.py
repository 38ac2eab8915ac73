"""Given/when/then tables for retention: a finished run is kept for its workflow's ``retention`` (else the machine's
default, LEGATO_RETENTION), then forgotten (docs/concepts/runs.md)."""
from __future__ import annotations

import pytest

from legato.topics.models import RunCancelRequested
from legato.workflows.machine import ForgetRun, Machine, StartTimer, outstanding
from tests.machine_helpers import T0, Harness, accepted, catalog_from, fired, ignored_in, timers_in

KEPT_2S = """
name: kept
retention: 2s
steps:
  - id: a
    activity: w
"""

DEFAULT = """
name: plain
steps:
  - id: a
    activity: w
"""


def machine(default_retention_s: float = 60.0) -> Machine:
    return Machine(catalog_from(KEPT_2S, DEFAULT), default_retention_s=default_retention_s)


@pytest.mark.parametrize("workflow,ends,retention_ms", [
    ("kept", "succeeded", 2_000),
    ("kept", "failed", 2_000),
    ("kept", "cancelled", 2_000),
    ("plain", "succeeded", 60_000),
])
def test_a_finished_run_keeps_only_its_retention_timer(workflow, ends, retention_ms):
    h = Harness(machine())
    h.start(workflow, now=T0)
    if ends == "succeeded":
        out = h.succeed("a", 1, now=T0 + 500)
    elif ends == "failed":
        out = h.fail("a", retryable=False, now=T0 + 500)
    else:
        out = h.deliver(RunCancelRequested(run_id="r1"), now=T0 + 500)
    assert h.status == ends
    assert [(t.timer_id, t.due_ms) for t in timers_in(out)] == [("run:retention", T0 + 500 + retention_ms)]
    assert set(h.state.timers) == {"run:retention"}


def test_until_its_retention_ends_a_trigger_with_its_run_id_starts_nothing_then_it_starts_a_new_run():
    h = Harness(machine())
    h.start("kept", now=T0)
    h.succeed("a", 1, now=T0 + 100)
    assert [i.reason for i in ignored_in(h.start("kept", now=T0 + 1_000))] == ["duplicate_trigger"]
    out = h.fire("run:retention")
    assert h.state is None and out == [ForgetRun(run_id="r1", workflow="kept")]
    h.start("kept", now=T0 + 3_000)
    assert h.status == "running" and h.state.started_ms == T0 + 3_000


def test_the_retention_timer_of_a_forgotten_run_fired_again_is_an_unknown_run():
    h = Harness(machine())
    h.start("kept", now=T0)
    h.succeed("a", 1, now=T0 + 100)
    h.fire("run:retention")
    assert [i.reason for i in ignored_in(h.deliver(fired("r1", "run:retention")))] == ["unknown_run"]


def test_a_retention_timer_on_a_running_run_is_stale():
    h = Harness(machine())
    h.start("kept", now=T0)
    assert [i.reason for i in ignored_in(h.deliver(fired("r1", "run:retention")))] == ["stale_timer"]
    assert h.status == "running"


def test_a_run_finished_before_runs_had_a_retention_timer_is_forgotten_when_the_shell_fires_one():
    h = Harness(machine())
    h.start("kept", now=T0)
    h.succeed("a", 1, now=T0 + 100)
    h.state = h.state.model_copy(update={"timers": {}})
    assert h.deliver(fired("r1", "run:retention")) == [ForgetRun(run_id="r1", workflow="kept")]


def test_a_replayed_event_reissues_the_retention_timer():
    h = Harness(machine())
    h.start("kept", now=T0)
    h.succeed("a", 1, now=T0 + 100)
    assert StartTimer(run_id="r1", timer_id="run:retention", due_ms=T0 + 2_100) in outstanding(h.state)


def test_an_unknown_workflow_is_kept_for_the_default_retention():
    h = Harness(machine(default_retention_s=7 * 24 * 3600))
    h.deliver(accepted("nope"), now=T0)
    assert h.state.timers["run:retention"].due_ms == T0 + 7 * 24 * 3600 * 1000
