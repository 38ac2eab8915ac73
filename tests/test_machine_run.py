"""Given/when/then tables for whole runs: start, refusals, run timeout, output, end/fail steps, the example."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.machine_helpers import (
    T0,
    Harness,
    accepted,
    compile_yaml,
    dump,
    example,
    fired,
    ignored_in,
    machine_from,
    requests_in,
    run_events_in,
    succeeded,
    terminal_events_in,
    timers_in,
)
from legato.workflows.machine import EventIgnored, Machine, PublishRunEvent, StartTimer, outstanding, replay
from legato.workflows.state import RunState

SIMPLE = """
name: simple
timeout: 1m
completion_topic: simple.done
steps:
  - id: a
    activity: w
  - id: b
    activity: w
"""

OUTPUT = """
name: shaped
output: "{'first': steps.a.output, 'second': steps.b.output.v, 'who': input.who}"
steps:
  - id: a
    activity: w
  - id: b
    activity: w
"""


def test_a_run_starts_with_run_started_then_its_first_request():
    h = Harness(machine_from(SIMPLE))
    out = h.start("simple", {"x": 1}, now=T0, correlation_id="c-7")
    assert isinstance(out[0], PublishRunEvent)
    ev = out[0].event
    assert (ev.type, ev.status, ev.run_id, ev.workflow, ev.correlation_id) == ("run.started", "running", "r1", "simple", "c-7")
    assert ev.started_at == "2023-11-14T22:13:20.000Z"
    assert [t.timer_id for t in timers_in(out)] == ["run:timeout", "a:timeout:1"]
    assert [r.step_id for r in requests_in(out)] == ["a"]
    assert h.state.version == 1 and h.state.input == {"x": 1}


def test_an_unknown_workflow_fails_at_once_without_run_started():
    h = Harness(machine_from(SIMPLE))
    out = h.start("nope", {"x": 1})
    assert [type(c) for c in out] == [StartTimer, PublishRunEvent]  # its retention, then run.failed
    ev = out[1].event
    assert (ev.type, ev.status) == ("run.failed", "failed")
    assert ev.error.type == "UnknownWorkflow" and "'nope'" in ev.error.message and "simple" in ev.error.message
    assert h.state.status == "failed" and h.state.version == 0


def test_a_duplicate_trigger_is_ignored():
    h = Harness(machine_from(SIMPLE))
    h.start("simple")
    before = h.state
    for trigger in (accepted("simple"), accepted("other", {"y": 2})):
        out = h.deliver(trigger)
        assert [(type(c), c.reason) for c in out] == [(EventIgnored, "duplicate_trigger")]
        assert h.state is before
    h.succeed("a", 1)
    h.succeed("b", 2)
    out = h.deliver(accepted("simple"))  # also once the run is over
    assert [c.reason for c in ignored_in(out)] == ["duplicate_trigger"] and len(out) == 1


def test_the_run_timeout_fails_the_run_and_cancels_everything():
    h = Harness(machine_from(SIMPLE))
    h.start("simple", now=T0)
    assert h.state.timers["run:timeout"].due_ms == T0 + 60_000
    req = h.pending_for("a")
    out = h.fire("run:timeout")
    [end] = terminal_events_in(out)
    assert end.event.type == "run.failed" and end.event.error.type == "RunTimeout"
    assert end.event.duration_ms == 60_000 and end.completion_topic == "simple.done"
    assert h.state.requests == {} and set(h.state.timers) == {"run:retention"}
    assert h.state.steps["a"].status == "cancelled"
    before = h.state
    out = h.deliver(succeeded(req, 1))
    assert [c.reason for c in ignored_in(out)] == ["run_finished"] and h.state is before


def test_a_timer_that_is_not_pending_is_ignored_as_stale():
    h = Harness(machine_from(SIMPLE))
    h.start("simple")
    before = h.state
    out = h.deliver(fired("r1", "no-such-timer"))
    assert [c.reason for c in out] == ["stale_timer"] and h.state is before


def test_default_output_is_the_last_steps_output_and_the_completion_topic_is_used():
    h = Harness(machine_from(SIMPLE))
    h.start("simple", now=T0)
    h.succeed("a", {"v": 1}, now=T0 + 10)
    out = h.succeed("b", {"v": 2}, now=T0 + 30)
    [end] = terminal_events_in(out)
    assert end.event.output == {"v": 2} and end.completion_topic == "simple.done"
    assert end.event.finished_at == "2023-11-14T22:13:20.030Z" and end.event.duration_ms == 30
    assert set(h.state.timers) == {"run:retention"}  # the run timeout is gone too


def test_the_workflow_output_expression_shapes_the_result():
    h = Harness(machine_from(OUTPUT))
    h.start("shaped", {"who": "me"})
    h.succeed("a", [1, 2])
    h.succeed("b", {"v": "two"})
    assert h.terminal().event.output == {"first": [1, 2], "second": "two", "who": "me"}
    assert h.state.output == h.terminal().event.output


def test_a_workflow_output_expression_that_errors_fails_the_run():
    h = Harness(machine_from(OUTPUT))
    h.start("shaped", {})  # input.who is missing
    h.succeed("a", 1)
    h.succeed("b", {"v": 2})
    end = h.terminal().event
    assert end.type == "run.failed" and end.error.type == "ExpressionError" and end.output is None


END_FAIL = """
name: endfail
steps:
  - id: a
    activity: w
  - id: stop
    end:
      when: "steps.a.output.n == 0"
      output: "{'stopped': true, 'n': steps.a.output.n}"
  - id: stop_plain
    end:
      when: "steps.a.output.n == 1"
  - id: refuse
    fail:
      when: "steps.a.output.n < 0"
      reason: "'negative: ' + string(steps.a.output.n)"
  - id: b
    activity: w
"""

# given the output of `a`, when the end/fail steps are reached, then the run ends, fails, or goes on to `b`
END_FAIL_TABLE = [
    (0, "succeeded", {"stopped": True, "n": 0}, None, ["a", "stop"]),
    (1, "succeeded", {"n": 1}, None, ["a", "stop", "stop_plain"]),  # end without output: the last output
    (-5, "failed", None, ("WorkflowFailed", "negative: -5"), ["a", "stop", "stop_plain", "refuse"]),
    (7, "running", None, None, ["a", "stop", "stop_plain", "refuse", "b"]),
]


@pytest.mark.parametrize("n,status,output,error,steps", END_FAIL_TABLE)
def test_end_and_fail_steps(n, status, output, error, steps):
    h = Harness(machine_from(END_FAIL))
    h.start("endfail")
    h.succeed("a", {"n": n})
    assert h.status == status
    assert list(h.state.steps) == steps
    if status == "running":
        assert [h.state.steps[s].status for s in ("stop", "stop_plain", "refuse")] == ["skipped"] * 3
        h.succeed("b", "B")
        assert h.terminal().event.output == "B"
        return
    end = h.terminal().event
    assert end.output == output
    if error:
        assert (end.error.type, end.error.message, end.error.retryable) == (*error, False)
        assert h.state.steps["refuse"].status == "failed"


def test_a_skipped_step_passes_the_previous_output_on():
    wf = """
name: skip
steps:
  - id: a
    activity: w
  - id: maybe
    fail: {when: "false", reason: "'x'"}
"""
    h = Harness(machine_from(wf))
    h.start("skip")
    h.succeed("a", "kept")
    assert h.terminal().event.output == "kept"


# every way a run can end produces exactly one terminal run event
ENDINGS = [
    ("success", lambda h: (h.succeed("a", 1), h.succeed("b", 2))),
    ("failure", lambda h: h.fail("a", "X", retryable=False)),
    ("activity timeout", lambda h: h.fire("a:timeout:1")),
    ("run timeout", lambda h: h.fire("run:timeout")),
]


@pytest.mark.parametrize("name,finish", ENDINGS, ids=[e[0] for e in ENDINGS])
def test_exactly_one_terminal_run_event_per_run(name, finish):
    h = Harness(machine_from(SIMPLE))
    h.start("simple")
    reqs = h.pending()
    finish(h)
    for req in reqs:  # and nothing said afterwards adds another one
        h.deliver(succeeded(req, "late"))
    h.deliver(fired("r1", "run:timeout"))
    h.deliver(accepted("simple"))
    assert len(terminal_events_in(h.commands)) == 1
    assert len([c for c in run_events_in(h.commands) if c.event.type == "run.started"]) == 1


def test_a_definition_removed_mid_run_fails_the_run_with_definition_changed():
    h = Harness(machine_from(SIMPLE))
    h.start("simple")
    req = h.pending_for("a")
    h.machine = Machine({})
    out = h.deliver(succeeded(req, 1))
    [end] = terminal_events_in(out)
    assert end.event.error.type == "DefinitionChanged"
    assert "'simple' v1" in end.event.error.message


def test_outstanding_reissues_pending_requests_and_timers_or_the_terminal_event():
    h = Harness(machine_from(SIMPLE))
    start = h.start("simple", now=T0)
    again = outstanding(h.state)
    assert sorted(map(repr, again)) == sorted(repr(c) for c in start if not isinstance(c, PublishRunEvent))
    h.succeed("a", 1)
    h.succeed("b", 2)
    retention, end = outstanding(h.state)
    assert isinstance(retention, StartTimer) and retention.timer_id == "run:retention"
    assert isinstance(end, PublishRunEvent) and end.event == h.terminal().event


def test_replay_of_the_log_gives_the_same_state_and_commands():
    h = Harness(machine_from(SIMPLE))
    h.start("simple", now=T0)
    h.fail("a", "Flaky", now=T0 + 5)  # no retries configured: the run fails
    state, commands = replay(h.machine, h.log)
    assert dump(state) == dump(h.state) and commands == h.commands


# --- the shipped example, end to end on both paths -----------------------------------------------


def triage() -> Harness:
    h = Harness(Machine({"support_triage": example("support_triage")}))
    h.start("support_triage", {"text": "I was charged twice", "email": "a@example.com"}, now=T0)
    return h


def enrich(h: Harness) -> None:
    out = requests_in(h.last)
    assert sorted(r.step_id for r in out) == ["customer", "history"]
    h.succeed("history", [{"ticket": 1}])
    h.succeed("customer", {"id": "c1", "plan": "pro"})


def test_support_triage_billing_path():
    h = triage()
    req = h.pending_for("classify")
    assert req.input == {"text": "I was charged twice"} and req.deadline == T0 + 5_000
    h.fail(req, "Overloaded")  # retried after 100 ms
    h.fire("classify:retry:1")
    h.succeed("classify", {"category": "billing"}, confidence=0.85, cost={"usd": 0.01, "model": "small"})
    enrich(h)
    billing = h.pending_for("billing")
    assert billing.input == {
        "ticket": {"text": "I was charged twice", "email": "a@example.com"},
        "customer": {"id": "c1", "plan": "pro"},
    }
    h.succeed(billing, {"reply": "refunded"}, cost={"usd": 0.02, "model": "big"})
    end = h.terminal().event
    assert end.type == "run.completed" and end.output == {"category": "billing", "path": "billing"}
    assert end.path == ["route:case0"] and h.state.path == ["route:case0"]
    assert end.cost == {"usd": 0.03, "models": {"small": 0.01, "big": 0.02}}
    assert "draft" not in h.state.view


# the billing case needs both a billing category and confidence >= 0.8; anything else drafts a reply
DRAFT_CASES = [
    ({"category": "billing"}, 0.79),
    ({"category": "tech"}, 0.99),
    ({"category": "tech"}, 0.1),
]


@pytest.mark.parametrize("classified,confidence", DRAFT_CASES)
def test_support_triage_draft_loop_path(classified, confidence):
    h = triage()
    h.succeed("classify", classified, confidence=confidence)
    enrich(h)
    rounds = []
    for score in (0.2, 0.5, 0.93):
        req = h.pending_for("write_reply")
        rounds.append(req.input["round"])
        assert req.input["ticket"] == {"text": "I was charged twice", "email": "a@example.com"}
        h.succeed(req, {"score": score, "text": f"draft {score}"})
    assert rounds == [0, 1, 2]
    end = h.terminal().event
    assert end.status == "succeeded"
    assert end.output == {"category": classified["category"], "path": "draft"}
    assert end.path == ["route:default"]


def test_support_triage_draft_loop_exhausted_fails():
    h = triage()
    h.succeed("classify", {"category": "tech"}, confidence=0.9)
    enrich(h)
    for _ in range(4):
        h.succeed("write_reply", {"score": 0.1})
    assert h.terminal().event.error.type == "LoopExhausted"


def test_support_triage_run_timeout_after_two_minutes():
    h = triage()
    assert h.state.timers["run:timeout"].due_ms == T0 + 120_000
    h.fire("run:timeout")
    assert h.terminal().event.error.type == "RunTimeout"


def test_the_documented_run_state_limit_is_what_the_machine_enforces():
    """docs/patterns/ai-controls.md documents the limit; a stored state (dumped as the coordinator stores it)
    never grows past it, whether one output is too big or many outputs add up."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "patterns" / "ai-controls.md").read_text(encoding="utf-8")
    limit = int(re.search(r"state is limited to (\d+) MiB", doc).group(1)) * 1024 * 1024
    wf = """
    name: big
    steps:
      - {id: one, activity: one, on_error: {default: small}}
      - {id: many, map: {items: "[1, 2, 3, 4, 5, 6, 7, 8]", steps: [{id: part, activity: part}]}}
    """
    h = Harness(Machine({"big": compile_yaml(wf)}))

    def stored() -> int:
        return len(h.state.model_dump_json(exclude_defaults=True))

    h.start("big")
    h.succeed("one", "x" * (limit // 2))  # held three times: refused
    assert h.state.steps["one"].error.type == "ContextTooLarge" and stored() <= limit
    while h.state.status == "running":
        h.succeed(h.pending()[0], "y" * (limit // 7))  # each fits; together they do not
        assert stored() <= limit
    assert h.state.status == "failed" and h.terminal().event.error.type == "ContextTooLarge"


def test_a_state_past_half_its_limit_is_not_measured_whole_on_every_event(monkeypatch):
    """A map whose state stays past half the limit (each item's step and frame kept until it ends) must not dump the
    whole document on every completion (that was O(N) per event: 10,000 items took 3.8 s of decide instead of 0.55 s):
    the estimate is re-measured once it grew past half the headroom the last measurement left, and the stored state
    still never passes the limit."""
    wf = """
    name: wide
    steps:
      - {id: many, map: {items: "input.items", max_concurrency: 64, steps: [{id: part, activity: part}]}}
    """
    limit = 100_000
    h = Harness(Machine({"wide": compile_yaml(wf)}, max_state_bytes=limit))
    measured = []
    real = RunState.encoded

    def counting(self):
        out = real(self)
        measured.append(len(out))
        return out

    monkeypatch.setattr(RunState, "encoded", counting)
    h.start("wide", {"items": list(range(600))})
    peak = 0
    events = 0
    while h.state.status == "running":
        h.succeed(h.pending()[0], {"ok": 1})
        events += 1
        peak = max(peak, len(real(h.state)))
    assert h.state.status == "succeeded"
    assert limit // 2 < peak <= limit  # the state did spend its time past half the limit
    assert events == 600 and 0 < len(measured) <= events // 5, len(measured)
