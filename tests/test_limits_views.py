"""What users see of limits (docs/limits.md): `legato runs show` and the console say what a step or a run waits for,
`legato trigger --priority` and the client's ``priority=`` are checked before anything is sent."""
from __future__ import annotations

import pytest

from legato.streams.cli import build_parser, main
from legato.streams.console.web import limit_waits
from legato.streams.runs import limit_key_names, limit_wait, render_run, render_table
from legato.topics.client import LegatoClient
from legato.topics.limits import LimitGranted
from legato.topics.models import RunRequested
from legato.workflows.state import RunState

from tests.machine_helpers import T0, Harness, machine_from

FLOW = """
name: t
limits:
  openai: {requests_per_minute: 500, concurrency: 20}
steps:
  - id: a
    activity: llm
    limit: openai
    limit_key: "${ input.tenant }"
  - id: b
    activity: llm
    limit: openai
"""

KEYED = """
name: keyed
concurrency: {key: "${ input.customer }", limit: 1}
steps:
  - id: a
    activity: llm
"""


def test_runs_show_says_which_limit_and_key_a_step_waits_for():
    h = Harness(machine_from(FLOW))
    h.start("t", {"tenant": "acme"}, now=T0, priority=5)
    text = render_table(h.state, limit_key_names(FLOW))
    row = next(line for line in text.splitlines() if line.startswith("a "))
    assert "waiting for limit openai (tenant acme)" in row
    assert text.splitlines()[0] == "run r1  workflow t v1  status running  priority 5"
    # without the definition the key has no name
    assert "waiting for limit openai (acme)" in render_table(h.state)
    h.deliver(LimitGranted(run_id=h.run_id, id="r1/a/1", limit="openai", key="acme", granted_ms=T0 + 5), T0 + 5)
    text = render_table(h.state, limit_key_names(FLOW))
    assert "waiting for" not in text
    assert next(line for line in text.splitlines() if line.startswith("a ")).split()[2] == "running"


def test_runs_show_says_a_run_waits_for_its_concurrency_key():
    h = Harness(machine_from(KEYED))
    h.start("keyed", {"customer": "customer-1"}, now=T0)
    run = {"run_id": "r1", "workflow": "keyed", "version": 1, "status": "running", "state": RunState.model_validate(h.state).model_dump(mode="json")}
    assert render_run(run, KEYED).splitlines()[0] == "run r1  workflow keyed v1  status running (waiting for concurrency key customer-1)"
    h.deliver(LimitGranted(run_id=h.run_id, id="run:r1", limit="run:keyed", key="customer-1", granted_ms=T0 + 5), T0 + 5)
    assert render_table(h.state).splitlines()[0] == "run r1  workflow keyed v1  status running"


@pytest.mark.parametrize("hold, name, text", [
    (None, None, None),
    ({"limit": "openai", "key": "acme", "waiting": False}, "tenant", None),
    ({"limit": "openai", "key": "acme", "waiting": True}, "tenant", "waiting for limit openai (tenant acme)"),
    ({"limit": "openai", "key": "", "waiting": True}, "tenant", "waiting for limit openai"),
    ({"limit": "run:orders", "key": "customer-1", "waiting": True}, None, "waiting for concurrency key customer-1"),
])
def test_limit_wait_text(hold, name, text):
    assert limit_wait(hold, name) == text


def test_key_names_come_from_simple_key_expressions_only():
    source = """
name: n
steps:
  - id: p
    parallel:
      branches:
        x: [{id: deep, activity: a, limit: l, limit_key: "${ input.customer.id }"}]
        y: [{id: mixed, activity: a, limit: l, limit_key: "tenant-${ input.tenant }"}]
"""
    assert limit_key_names(source) == {"deep": "id"}
    assert limit_key_names(None) == {} and limit_key_names("{not: yaml") == {}


def test_the_console_marks_waiting_steps_and_the_run():
    h = Harness(machine_from(FLOW))
    h.start("t", {"tenant": "acme"}, now=T0)
    state = RunState.model_validate(h.state).model_dump(mode="json")
    run_text, steps = limit_waits(state, FLOW)
    assert run_text is None
    assert steps == {"a": "waiting for limit openai (tenant acme)"}  # b has not started yet
    h2 = Harness(machine_from(KEYED))
    h2.start("keyed", {"customer": "customer-1"}, now=T0)
    assert limit_waits(RunState.model_validate(h2.state).model_dump(mode="json"), None) == ("waiting for concurrency key customer-1", {})


@pytest.mark.parametrize("value", ["0", "6", "high", "2.5"])
def test_trigger_priority_is_1_to_5(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["trigger", "wf", "--priority", value])
    assert exc.value.code == 2
    assert "--priority" in capsys.readouterr().err


def test_trigger_priority_parses():
    args = build_parser().parse_args(["trigger", "wf", "--priority", "5"])
    assert args.priority == 5
    assert build_parser().parse_args(["trigger", "wf"]).priority is None


@pytest.mark.parametrize("priority", [0, 6, True, "3", 2.0])
async def test_client_refuses_a_priority_outside_1_to_5(priority):
    client = LegatoClient("localhost:1")
    client._producer = object()  # never used: the priority is checked first
    with pytest.raises(ValueError, match="priority"):
        await client.trigger("wf", {}, priority=priority)


def test_the_trigger_record_carries_the_priority():
    assert RunRequested(workflow="wf", priority=4).model_dump(exclude_none=True) == {"workflow": "wf", "input": {}, "priority": 4}
