"""Given/when/then tables for activity steps: success, input templates, retries, timeouts, refused completions."""
from __future__ import annotations

import pytest

from legato.workflows.machine import _jitter

from tests.machine_helpers import (
    T0,
    Harness,
    dump,
    failed,
    ignored_in,
    machine_from,
    requests_in,
    succeeded,
    terminal_events_in,
    timers_in,
)
from legato.topics.models import ActivityCompleted, ActivityRequested
from legato.workflows.machine import EventIgnored

ONE = """
name: one
steps:
  - id: a
    activity: work
    input: {text: "${ input.text }"}
"""

TWO = """
name: two
steps:
  - id: a
    activity: work
  - id: b
    activity: more
    input:
      whole: "${ steps.a.output }"
      x: "${ steps.a.output.x }"
      doubled: "${ steps.a.output.x * 2 }"
      conf: "${ steps.a.confidence }"
"""


def retrying(max_attempts: int = 3, backoff: str = "100ms", multiplier: float = 2, max_backoff: str = "1s", timeout: str = "5s", jitter: str = "false") -> str:
    return f"""
name: retrying
steps:
  - id: a
    activity: flaky
    input: {{n: "${{ input.n }}"}}
    timeout: {timeout}
    retry: {{max_attempts: {max_attempts}, backoff: {backoff}, multiplier: {multiplier}, max_backoff: {max_backoff}, jitter: {jitter}}}
"""


# --- success --------------------------------------------------------------------------------------


def test_start_requests_the_first_activity_with_rendered_input_and_a_timeout_timer():
    # given a one-step workflow; when the run is accepted
    h = Harness(machine_from(ONE))
    out = h.start("one", {"text": "hello"}, now=T0)
    # then one request, attempt 1, with a deterministic id, and its default (600 s) timeout timer
    [req] = requests_in(out)
    assert req.request_id == "r1/a/1"
    assert (req.step_id, req.activity, req.attempt, req.input) == ("a", "work", 1, {"text": "hello"})
    assert req.deadline == T0 + 600_000 and req.requested_ms == T0
    assert [(t.timer_id, t.due_ms) for t in timers_in(out)] == [("a:timeout:1", T0 + 600_000)]
    assert h.state.requests == {"r1/a/1": "a"}


def test_success_finishes_the_run_with_the_activity_output():
    h = Harness(machine_from(ONE))
    h.start("one", {"text": "hello"}, now=T0)
    out = h.succeed("a", {"answer": 42}, confidence=0.7, now=T0 + 250)
    [end] = terminal_events_in(out)
    assert end.event.type == "run.completed" and end.event.status == "succeeded"
    assert end.event.output == {"answer": 42}
    assert end.event.duration_ms == 250
    step = h.state.steps["a"]
    assert (step.status, step.output, step.confidence, step.attempt) == ("succeeded", {"answer": 42}, 0.7, 1)
    assert h.state.view["a"] == {"output": {"answer": 42}, "status": "succeeded", "confidence": 0.7, "attempt": 1, "cached": False}
    assert h.state.requests == {} and set(h.state.timers) == {"run:retention"}


def test_output_confidence_and_cost_are_passed_on_to_the_next_step():
    h = Harness(machine_from(TWO))
    h.start("two")
    out = h.succeed("a", {"x": 21, "tag": "t"}, confidence=0.5, cost={"usd": 0.25, "tokens_in": 10, "model": "m1"})
    [req] = requests_in(out)
    assert req.step_id == "b"
    assert req.input == {"whole": {"x": 21, "tag": "t"}, "x": 21, "doubled": 42, "conf": 0.5}
    h.succeed("b", "done", cost={"usd": 0.5, "tokens_out": 3, "model": "m1"})
    assert h.state.cost == {"usd": 0.75, "tokens_in": 10, "tokens_out": 3, "models": {"m1": 0.75}}
    assert h.terminal().event.cost == h.state.cost
    assert h.terminal().event.output == "done"


# given an input mapping, when the step starts, then "${ expr }" strings become typed values and the rest is literal
TEMPLATES = [
    ({"n": "${ input.n }"}, {"n": 3}, {"n": 3}),
    ({"n": "${ input.n + 1 }"}, {"n": 3}, {"n": 4}),
    ({"s": "${input.s}"}, {"s": "x"}, {"s": "x"}),  # no spaces needed
    ({"ok": "${ input.n > 2 }"}, {"n": 3}, {"ok": True}),
    ({"all": "${ input }"}, {"n": 1, "l": [1, 2]}, {"all": {"n": 1, "l": [1, 2]}}),
    ({"list": ["${ input.n }", "lit", 7]}, {"n": 5}, {"list": [5, "lit", 7]}),
    ({"deep": {"x": {"y": "${ input.n * 10 }"}}}, {"n": 2}, {"deep": {"x": {"y": 20}}}),
    ({"literal": "n is ${ input.n }"}, {"n": 1}, {"literal": "n is ${ input.n }"}),  # not a whole-string template
    ({"literal": "input.n"}, {"n": 1}, {"literal": "input.n"}),
    ({"num": 1.5, "flag": False, "none": None}, {}, {"num": 1.5, "flag": False, "none": None}),
    ({"map": "${ {'k': input.n} }"}, {"n": 9}, {"map": {"k": 9}}),
    ("${ input.n }", {"n": 7}, 7),  # a whole input may be one expression
    ("just text", {}, "just text"),
    (None, {"n": 1}, {}),  # no input: an empty mapping
]


@pytest.mark.parametrize("template,run_input,expected", TEMPLATES)
def test_input_templates_render_typed_values_and_literals(template, run_input, expected):
    import json

    wf = f"""
name: tpl
steps:
  - id: a
    activity: work
    input: {json.dumps(template)}
"""
    h = Harness(machine_from(wf))
    [req] = requests_in(h.start("tpl", run_input))
    assert req.input == expected


def test_an_input_template_that_fails_to_evaluate_fails_the_run_with_expression_error():
    h = Harness(machine_from(ONE))
    out = h.start("one", {})  # input.text is missing
    assert requests_in(out) == []
    end = h.terminal().event
    assert end.type == "run.failed" and end.error.type == "ExpressionError"
    assert "step a" in end.error.message and h.state.steps["a"].status == "failed"


# --- retries ----------------------------------------------------------------------------------------

# given a retry policy, when attempt n fails retryably at time t, then a retry timer is due at t + delay(n)
RETRY_DELAYS = [
    # (backoff, multiplier, max_backoff, expected delays in ms after attempts 1, 2, 3, ...)
    ("100ms", 2, "1s", [100, 200, 400, 800, 1000, 1000]),
    ("1s", 3, "10s", [1000, 3000, 9000, 10000]),
    ("250ms", 1, "1s", [250, 250, 250]),
    ("2s", 2, "3s", [2000, 3000, 3000]),
    ("0.5", 2, "60s", [500, 1000, 2000]),  # a bare number is seconds
]


def test_retry_backoff_has_deterministic_jitter_by_default():
    # given the default jitter; when attempt 1 fails; then the backoff is scaled by a factor in [0.8, 1.2)
    # derived from the request id, so many runs spread their retries and a replay computes the same instant
    h = Harness(machine_from(retrying(3, "1s", 2, "10s", jitter="true")))
    h.start("retrying", {"n": 1}, now=T0)
    out = h.fail(h.pending_for("a"), retryable=True, now=T0 + 1000)
    [timer] = timers_in(out)
    factor = _jitter("r1/a/1")
    assert 0.8 <= factor < 1.2
    assert timer.due_ms == T0 + 1000 + round(1.0 * factor * 1000)


@pytest.mark.parametrize("backoff,multiplier,max_backoff,delays", RETRY_DELAYS)
def test_retry_timer_is_due_after_capped_exponential_backoff(backoff, multiplier, max_backoff, delays):
    attempts = len(delays) + 1
    h = Harness(machine_from(retrying(attempts, backoff, multiplier, max_backoff)))
    h.start("retrying", {"n": 1}, now=T0)
    now = T0
    for n, delay in enumerate(delays, start=1):
        now += 1_000
        req = h.pending_for("a")
        assert (req.attempt, req.request_id) == (n, f"r1/a/{n}")
        out = h.fail(req, retryable=True, now=now)
        assert [(t.timer_id, t.due_ms) for t in timers_in(out)] == [(f"a:retry:{n}", now + delay)]
        assert requests_in(out) == [] and h.pending() == []
        assert h.state.steps["a"].status == "waiting_retry"
        assert set(h.state.timers) == {f"a:retry:{n}"}  # the attempt's timeout timer is gone
        # when the retry timer fires at its due time, then attempt n+1 is requested with a new id
        due = now + delay
        out = h.fire(f"a:retry:{n}")
        [again] = requests_in(out)
        assert again.request_id == f"r1/a/{n + 1}" and again.attempt == n + 1
        assert again.input == {"n": 1} and again.requested_ms == due and again.deadline == due + 5_000
        assert [(t.timer_id, t.due_ms) for t in timers_in(out)] == [(f"a:timeout:{n + 1}", due + 5_000)]
        now = due
    assert h.status == "running"


def test_success_on_a_later_attempt_completes_the_step():
    h = Harness(machine_from(retrying(3)))
    h.start("retrying", {"n": 1})
    h.fail("a")
    h.fire("a:retry:1")
    out = h.succeed("a", {"ok": True})
    assert h.terminal().event.output == {"ok": True}
    assert h.state.steps["a"].attempt == 2 and h.state.view["a"]["attempt"] == 2
    assert terminal_events_in(out)


def test_retries_exhausted_fail_the_run_with_the_last_error():
    h = Harness(machine_from(retrying(2)))
    h.start("retrying", {"n": 1})
    h.fail("a", "First")
    h.fire("a:retry:1")
    out = h.fail("a", "Second")
    assert [t.timer_id for t in timers_in(out)] == ["run:retention"]  # no retry: only the finished run's retention
    end = h.terminal().event
    assert end.type == "run.failed" and end.error.type == "Second"
    assert h.state.steps["a"].status == "failed" and h.state.steps["a"].attempt == 2


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_a_non_retryable_error_fails_at_once(max_attempts):
    h = Harness(machine_from(retrying(max_attempts)))
    h.start("retrying", {"n": 1})
    out = h.fail("a", "BadInput", retryable=False)
    assert [t.timer_id for t in timers_in(out)] == ["run:retention"] and requests_in(out) == []
    end = h.terminal().event
    assert end.status == "failed" and end.error.type == "BadInput" and end.error.retryable is False
    assert h.state.steps["a"].status == "failed" and set(h.state.timers) == {"run:retention"}


def test_a_failure_without_error_info_is_a_retryable_activity_failed():
    h = Harness(machine_from(retrying(2)))
    h.start("retrying", {"n": 1})
    req = h.pending_for("a")
    bare = ActivityCompleted(request_id=req.request_id, run_id="r1", step_id="a", attempt=1, status="failed")
    out = h.deliver(bare)
    assert [t.timer_id for t in timers_in(out)] == ["a:retry:1"]
    assert h.state.steps["a"].error.type == "ActivityFailed"


# --- activity timeouts ------------------------------------------------------------------------------


def test_activity_timeout_with_attempts_left_schedules_a_retry():
    h = Harness(machine_from(retrying(2, timeout="5s")))
    h.start("retrying", {"n": 1}, now=T0)
    assert h.state.timers["a:timeout:1"].due_ms == T0 + 5_000
    out = h.fire("a:timeout:1")
    assert [(t.timer_id, t.due_ms) for t in timers_in(out)] == [("a:retry:1", T0 + 5_000 + 100)]
    step = h.state.steps["a"]
    assert step.status == "waiting_retry" and step.error.type == "ActivityTimeout" and step.error.retryable
    assert h.pending() == []
    [req] = requests_in(h.fire("a:retry:1"))
    assert req.request_id == "r1/a/2"


def test_activity_timeout_on_the_last_attempt_fails_with_status_timed_out():
    h = Harness(machine_from(retrying(1, timeout="2s")))
    h.start("retrying", {"n": 1}, now=T0)
    out = h.fire("a:timeout:1")
    [end] = terminal_events_in(out)
    assert end.event.type == "run.failed" and end.event.error.type == "ActivityTimeout"
    assert end.event.duration_ms == 2_000
    assert h.state.steps["a"].status == "timed_out"
    assert h.state.view["a"]["status"] == "timed_out"


def test_a_late_completion_after_the_timeout_is_ignored():
    h = Harness(machine_from(retrying(1, timeout="2s")))
    h.start("retrying", {"n": 1})
    req = h.pending_for("a")
    h.fire("a:timeout:1")
    before = dump(h.state)
    out = h.deliver(succeeded(req, {"late": True}))
    assert [type(c) for c in out] == [EventIgnored]
    assert ignored_in(out)[0].reason == "run_finished"
    assert dump(h.state) == before


# --- refused completions ----------------------------------------------------------------------------


def test_a_completion_with_a_stale_attempt_number_is_ignored_as_stale_attempt():
    # given attempt 2 pending; when a completion for its request id claims attempt 1
    h = Harness(machine_from(retrying(3)))
    h.start("retrying", {"n": 1})
    h.fail("a")
    h.fire("a:retry:1")
    current = h.pending_for("a")
    before = h.state
    out = h.deliver(succeeded(current, {"x": 1}, attempt=1))
    # then it is refused as stale and the state is the same
    assert [(c.reason, c.run_id) for c in ignored_in(out)] == [("stale_attempt", "r1")] and len(out) == 1
    assert h.state is before
    assert h.pending_for("a").attempt == 2


def test_a_late_completion_of_an_earlier_attempt_is_ignored_as_stale_attempt():
    """Regression: a worker's late answer to attempt 1, arriving after attempt 2 was requested, used to be
    reported as ``unknown_request`` (state.requests only keeps the pending id, which embeds the attempt)."""
    h = Harness(machine_from(retrying(3)))
    h.start("retrying", {"n": 1})
    first = h.pending_for("a")
    h.fail(first)
    h.fire("a:retry:1")
    before = h.state
    out = h.deliver(succeeded(first, {"late": True}))
    assert h.state is before and len(out) == 1
    assert ignored_in(out)[0].reason == "stale_attempt"


def test_a_late_completion_of_an_earlier_attempt_is_ignored_and_leaves_the_state_unchanged():
    h = Harness(machine_from(retrying(3)))
    h.start("retrying", {"n": 1})
    first = h.pending_for("a")
    h.fail(first)
    h.fire("a:retry:1")
    before = dump(h.state)
    out = h.deliver(succeeded(first, {"late": True}))
    assert [type(c) for c in out] == [EventIgnored]
    assert dump(h.state) == before
    assert h.pending_for("a").attempt == 2


@pytest.mark.parametrize("make", [lambda r: succeeded(r, {"x": 1}), lambda r: failed(r, retryable=False)], ids=["success", "failure"])
def test_a_duplicate_completion_is_ignored_and_the_state_is_unchanged(make):
    h = Harness(machine_from(TWO))
    h.start("two")
    event = make(h.pending_for("a"))
    h.deliver(event)
    before = h.state
    snapshot = dump(before)
    out = h.deliver(event)
    assert [c.reason for c in ignored_in(out)] == [("run_finished" if before.finished else "duplicate_completion")]
    assert len(out) == 1 and h.state is before and dump(h.state) == snapshot


def test_a_completion_for_a_request_never_made_is_ignored_as_unknown_request():
    h = Harness(machine_from(ONE))
    h.start("one", {"text": "x"})
    before = h.state
    ghost = ActivityRequested(request_id="r1/zzz/1", run_id="r1", step_id="zzz", activity="work", attempt=1)
    out = h.deliver(succeeded(ghost, 1))
    [ign] = out
    assert isinstance(ign, EventIgnored) and ign.reason == "unknown_request" and "r1/zzz/1" in ign.detail
    assert h.state is before


def test_a_completion_for_an_unknown_run_is_ignored_as_unknown_run():
    h = Harness(machine_from(ONE))
    ghost = ActivityRequested(request_id="r9/a/1", run_id="r9", step_id="a", activity="work", attempt=1)
    out = h.deliver(succeeded(ghost, 1))
    assert h.state is None
    assert [(c.reason, c.run_id) for c in ignored_in(out)] == [("unknown_run", "r9")]


def test_a_completion_after_the_run_finished_is_ignored_as_run_finished():
    h = Harness(machine_from(ONE))
    h.start("one", {"text": "x"})
    req = h.pending_for("a")
    h.succeed(req, 1)
    before = h.state
    for event in (succeeded(req, 2), failed(req), succeeded(req, 2, attempt=5)):
        out = h.deliver(event)
        assert [c.reason for c in ignored_in(out)] == ["run_finished"] and len(out) == 1
        assert h.state is before
    assert len(terminal_events_in(h.commands)) == 1


def test_timer_due_times_and_deadlines_keep_every_millisecond_of_a_duration():
    """Regression: due times were ``now + int(seconds * 1000)``; durations are parsed to float seconds, so
    ``4007ms`` -> 4.007 s -> 4006.999... ms was truncated to 4006."""
    wf = """
name: t
steps:
  - id: a
    activity: work
    timeout: 4007ms
"""
    h = Harness(machine_from(wf))
    out = h.start("t", now=0)
    [req] = requests_in(out)
    assert [t.due_ms for t in timers_in(out)] == [4007]
    assert req.deadline == 4007
