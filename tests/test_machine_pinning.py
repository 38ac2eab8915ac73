"""Given/when/then tables for pinning: a run is decided by the definition (name, version, sha256) it started with,
whatever is deployed later (docs/concepts/runs.md)."""
from __future__ import annotations

from legato.workflows.catalog import Catalog, Definition, source_sha256
from legato.workflows.machine import Machine
from tests.machine_helpers import Harness, compile_yaml, requests_in, run_events_in, terminal_events_in

V1 = """
name: flow
version: 1
steps:
  - id: a
    activity: w
  - id: b
    activity: w
"""

V2 = """
name: flow
version: 2
steps:
  - id: a
    activity: w
  - id: new_in_v2
    activity: w
  - id: b
    activity: w
"""

V3 = """
name: flow
version: 3
steps:
  - id: a
    activity: w
"""

V1_EDITED = V1 + "description: the same name@version with other text\n"

PARENT = """
name: parent
steps:
  - id: sub
    workflow: flow
    version: 1
"""


def definition(text: str) -> Definition:
    return Definition(compile_yaml(text), source_sha256(text))


class Deployed:
    """What is deployed, changed by the test while a run is in flight (a coordinator's live table)."""

    def __init__(self, *texts: str):
        self.catalog = Catalog.of([definition(t) for t in texts])

    def deploy(self, text: str) -> None:
        self.catalog = self.catalog.with_definition(definition(text))

    def machine(self) -> Machine:
        return Machine(lambda: self.catalog)


def steps_requested(h: Harness) -> list[str]:
    return [r.step_id for r in requests_in(h.commands)]


def test_a_run_started_under_v1_carries_on_under_v1_after_v2_is_deployed():
    deployed = Deployed(V1)
    h = Harness(deployed.machine())
    h.start("flow")
    assert (h.state.version, h.state.sha256) == (1, source_sha256(V1))
    deployed.deploy(V2)
    h.succeed("a", 1)
    h.succeed("b", 2)
    assert steps_requested(h) == ["a", "b"]
    [end] = terminal_events_in(h.commands)
    assert (end.event.type, end.event.version) == ("run.completed", 1)


def test_a_new_run_gets_the_highest_version_deployed_when_it_starts():
    deployed = Deployed(V1)
    machine = deployed.machine()
    deployed.deploy(V2)
    h = Harness(machine, run_id="r2")
    out = h.start("flow")
    [started] = run_events_in(out)
    assert (started.event.type, started.event.version) == ("run.started", 2)
    h.succeed("a", 1)
    assert steps_requested(h) == ["a", "new_in_v2"]


def test_a_trigger_naming_a_version_runs_that_version():
    h = Harness(Deployed(V1, V2).machine())
    h.start("flow", version=1)
    h.succeed("a", 1)
    assert h.state.version == 1 and steps_requested(h) == ["a", "b"]


def test_a_v3_that_dropped_steps_does_not_make_a_v1_run_skip_them():
    deployed = Deployed(V1)
    h = Harness(deployed.machine())
    h.start("flow")
    deployed.deploy(V3)
    h.succeed("a", 1)
    assert steps_requested(h) == ["a", "b"] and h.status == "running"
    h.succeed("b", 2)
    assert h.status == "succeeded" and h.state.output == 2


def test_an_unknown_version_fails_the_run_naming_the_deployed_ones():
    h = Harness(Deployed(V1, V2).machine())
    h.start("flow", version=7)
    [end] = terminal_events_in(h.commands)
    assert end.event.error.type == "UnknownWorkflow"
    assert end.event.error.message == "workflow 'flow' has no version 7 (deployed: 1, 2)"


def test_other_text_under_the_pinned_name_and_version_fails_the_run_with_definition_changed():
    deployed = Deployed(V1)
    h = Harness(deployed.machine())
    h.start("flow")
    deployed.catalog = Catalog.of([definition(V1_EDITED)])  # a raw producer's record, once compaction removed V1
    h.succeed("a", 1)
    [end] = terminal_events_in(h.commands)
    assert (end.event.error.type, end.event.version) == ("DefinitionChanged", 1)
    assert end.event.error.message == f"workflow 'flow' v1 (sha256 {source_sha256(V1)[:12]}) is no longer deployed as the run started it"
    assert steps_requested(h) == ["a"]


def test_a_state_started_before_pinning_is_decided_by_its_name_and_version_without_the_check():
    deployed = Deployed(V1)
    h = Harness(deployed.machine())
    h.start("flow")
    h.state = h.state.model_copy(update={"sha256": ""})
    deployed.catalog = Catalog.of([definition(V1_EDITED)])
    h.succeed("a", 1)
    assert steps_requested(h) == ["a", "b"]


def test_a_child_run_gets_the_version_its_step_pins():
    h = Harness(Deployed(V1, V2, PARENT).machine())
    out = h.start("parent")
    [child] = [c.accepted for c in out if type(c).__name__ == "StartChildRun"]
    assert (child.workflow, child.version) == ("flow", 1)
    c = Harness(Deployed(V1, V2).machine(), run_id=child.run_id)
    c.deliver(child)
    assert c.state.version == 1
