"""Given/when/then tables for fork: a new run of the source's pinned definition starts with the steps before the fork
point copied (outputs, cost, paths) and runs from it on (docs/concepts/runs.md)."""
from __future__ import annotations

from legato.topics.models import RunForkRequested
from legato.workflows.machine import StartForkedRun
from tests.machine_helpers import T0, Harness, ignored_in, machine_from, requests_in, run_events_in, terminal_events_in

THREE = """
name: three
steps:
  - id: one
    activity: w
  - id: two
    activity: w
    input: {prev: "${ steps.one.output }", n: "${ input.n }"}
  - id: three
    activity: w
output: "{'one': steps.one.output, 'two': steps.two.output, 'three': steps.three.output}"
"""


def finished_source(machine) -> Harness:
    h = Harness(machine, run_id="src")
    h.start("three", {"n": 1}, now=T0)
    h.succeed("one", "first", cost={"usd": 0.5, "model": "m"})
    h.succeed("two", "second")
    h.succeed("three", "third")
    return h


def fork(h: Harness, step: str, new_run_id: str = "f1", input: dict | None = None):
    return h.deliver(RunForkRequested(run_id=h.run_id, from_step=step, new_run_id=new_run_id, input=input))


def test_a_fork_from_step_two_runs_two_and_three_with_step_ones_output_and_cost():
    machine = machine_from(THREE)
    source = finished_source(machine)
    before = source.state.model_copy(deep=True)
    [start] = fork(source, "two", input={"n": 2})
    assert isinstance(start, StartForkedRun) and source.state.model_dump(exclude={"cursor"}) == before.model_dump(exclude={"cursor"})
    h = Harness(machine, run_id="f1")
    out = h.deliver(start.seed, now=T0 + 1_000)
    [started] = run_events_in(out)
    assert (started.event.type, started.event.forked_from) == ("run.started", {"run_id": "src", "step": "two"})
    [request] = requests_in(out)
    assert (request.step_id, request.input) == ("two", {"prev": "first", "n": 2})
    h.succeed("two", "second again")
    h.succeed("three", "third again")
    [end] = terminal_events_in(h.commands)
    assert end.event.output == {"one": "first", "two": "second again", "three": "third again"}
    assert end.event.cost["usd"] == 0.5 and end.event.forked_from == {"run_id": "src", "step": "two"}


def test_a_repeated_fork_seed_starts_nothing_new():
    machine = machine_from(THREE)
    [start] = fork(finished_source(machine), "two")
    h = Harness(machine, run_id="f1")
    h.deliver(start.seed)
    assert [i.reason for i in ignored_in(h.deliver(start.seed))] == ["duplicate_trigger"]


def test_a_fork_from_a_step_that_is_not_top_level_or_not_reached_is_refused():
    machine = machine_from(THREE)
    h = Harness(machine, run_id="src")
    h.start("three", {"n": 1})
    [refused] = ignored_in(fork(h, "three"))
    assert refused.reason == "fork_refused" and refused.detail == "step 'one' did not finish in run src (running): fork from it or an earlier step"
    [refused] = ignored_in(fork(h, "zz"))
    assert refused.detail.startswith("'zz' is no step of three@1")


def test_a_fork_of_an_unknown_run_is_refused():
    h = Harness(machine_from(THREE), run_id="gone")
    [refused] = ignored_in(fork(h, "two"))
    assert (refused.reason, refused.detail) == ("fork_refused", "no run 'gone' (unknown, or forgotten after its retention)")
