"""Given/when/then tables for an activity's on_error (fail | continue | default | fallback), retries with
exponential backoff and deterministic jitter, and non_retryable error types."""
from __future__ import annotations

import json
from typing import Any

import pytest

from tests.machine_helpers import T0, Harness, compile_yaml, machine_from, requests_in, timers_in
from legato.workflows.machine import CancelRequest, _jitter
from legato.workflows.model import DefinitionError, Retry


def flow(on_error: Any = "fail", retry: dict[str, Any] | None = None, non_retryable: list[str] | None = None, timeout: str | None = None) -> str:
    risky: dict[str, Any] = {"id": "risky", "activity": "risky", "input": {"q": "${ input.q }"}, "on_error": on_error}
    if retry:
        risky["retry"] = retry
    if non_retryable:
        risky["non_retryable"] = non_retryable
    if timeout:
        risky["timeout"] = timeout
    doc = {"name": "flow", "steps": [risky, {"id": "next", "activity": "next", "input": {"got": "${ steps.risky.output }", "status": "${ steps.risky.status }"}}]}
    return json.dumps(doc)


# --- on_error -----------------------------------------------------------------------------------------


# given an on_error, when the activity fails for good, then the step and the run go on like this
@pytest.mark.parametrize("on_error,step_status,next_input", [
    ("continue", "failed", {"got": None, "status": "failed"}),
    ({"default": {"label": "unknown"}}, "failed", {"got": {"label": "unknown"}, "status": "failed"}),
    ({"default": None}, "failed", {"got": None, "status": "failed"}),
    ({"default": [1, 2]}, "failed", {"got": [1, 2], "status": "failed"}),
])
def test_on_error_lets_the_run_go_on(on_error, step_status, next_input):
    h = Harness(machine_from(flow(on_error)))
    h.start("flow", {"q": 1})
    out = h.fail("risky", "Boom", retryable=False)
    assert h.state.steps["risky"].status == step_status
    assert h.state.steps["risky"].error.type == "Boom"
    assert [r.input for r in requests_in(out)] == [next_input]
    h.succeed("next", "done")
    assert h.terminal().event.status == "succeeded"


def test_on_error_fail_fails_the_run():
    h = Harness(machine_from(flow("fail")))
    h.start("flow", {"q": 1})
    h.fail("risky", "Boom", retryable=False)
    assert h.terminal().event.error.type == "Boom"


def test_on_error_applies_only_after_the_retries_are_spent():
    h = Harness(machine_from(flow({"default": "D"}, retry={"max_attempts": 3, "backoff": "1s", "jitter": False})))
    h.start("flow", {"q": 1})
    for attempt in (1, 2):
        h.fail("risky", "Flaky", retryable=True)
        assert h.state.steps["risky"].status == "waiting_retry"
        h.fire(f"risky:retry:{attempt}")
    out = h.fail("risky", "Flaky", retryable=True)
    assert [r.input for r in requests_in(out)] == [{"got": "D", "status": "failed"}]


def test_on_error_applies_to_a_timeout_on_the_last_attempt():
    h = Harness(machine_from(flow("continue", timeout="5s")))
    h.start("flow", {"q": 1})
    out = h.fire("risky:timeout:1")
    assert h.state.steps["risky"].status == "timed_out"
    assert h.state.steps["risky"].error.type == "ActivityTimeout"
    assert [r.input for r in requests_in(out)] == [{"got": None, "status": "timed_out"}]


FALLBACK = {"fallback": [
    {"id": "human", "activity": "human_review", "input": {"q": "${ input.q }"}},
    {"id": "polish", "activity": "polish", "input": {"text": "${ steps.human.output }"}},
]}


def test_fallback_steps_run_instead_and_their_output_is_the_steps_output():
    h = Harness(machine_from(flow(FALLBACK)))
    h.start("flow", {"q": 7})
    out = h.fail("risky", "Boom", retryable=False)
    [review] = requests_in(out)
    assert review.step_id == "human" and review.input == {"q": 7}
    assert review.request_id == "r1/risky/fallback/human/1"
    assert h.state.steps["risky"].status == "running"
    h.succeed(review, "by hand")
    h.succeed("polish", "polished by hand")
    assert h.state.steps["risky"].status == "succeeded"
    assert h.state.steps["risky"].output == "polished by hand"
    assert h.pending_for("next").input == {"got": "polished by hand", "status": "succeeded"}


def test_a_failing_fallback_fails_the_step():
    h = Harness(machine_from(flow(FALLBACK)))
    h.start("flow", {"q": 7})
    h.fail("risky", "Boom", retryable=False)
    h.fail("human", "NobodyThere", retryable=False)
    assert h.state.steps["risky"].status == "failed"
    assert h.terminal().event.error.type == "NobodyThere"


def test_a_fallback_is_not_run_when_the_activity_succeeds():
    h = Harness(machine_from(flow(FALLBACK)))
    h.start("flow", {"q": 7})
    h.succeed("risky", "fine")
    assert h.pending_steps() == ["next"]


def test_a_fallback_with_an_end_step_finishes_the_run():
    h = Harness(machine_from(flow({"fallback": [{"id": "give_up", "end": {"output": "'gave up'"}}]})))
    h.start("flow", {"q": 7})
    h.fail("risky", "Boom", retryable=False)
    assert h.terminal().event.output == "gave up"


def test_on_error_inside_a_parallel_branch_keeps_the_branch_alive():
    wf = """
    name: par
    steps:
      - id: p
        parallel:
          branches:
            a: [{id: a, activity: a, on_error: {default: "A?"}}]
            b: [{id: b, activity: b}]
    """
    h = Harness(machine_from(wf))
    h.start("par")
    out = h.fail("a", retryable=False)
    assert not [c for c in out if isinstance(c, CancelRequest)]
    h.succeed("b", "B")
    assert h.terminal().event.output == {"a": "A?", "b": "B"}


def test_duplicate_ids_in_a_fallback_are_refused():
    with pytest.raises(DefinitionError) as caught:
        compile_yaml(flow({"fallback": [{"id": "risky", "activity": "x"}]}))
    assert caught.value.path == "steps[0].on_error.fallback[0].id" and "duplicate step id 'risky'" in caught.value.reason
    with pytest.raises(DefinitionError) as caught:  # the fallback is compiled before the later steps
        compile_yaml(flow({"fallback": [{"id": "next", "activity": "x"}]}))
    assert caught.value.path == "steps[1].id" and "first at steps[0].on_error.fallback[0]" in caught.value.reason


@pytest.mark.parametrize("on_error", ["ignore", {"fallback": []}, {"default": 1, "fallback": [{"id": "z", "activity": "z"}]}])
def test_a_malformed_on_error_is_refused(on_error):
    with pytest.raises(DefinitionError) as caught:
        compile_yaml(flow(on_error))
    assert caught.value.path.startswith("steps[0].on_error")


# --- retries: exponential backoff with deterministic jitter ---------------------------------------------


def _retry_delays(h: Harness, attempts: int) -> list[int]:
    delays = []
    for attempt in range(1, attempts):
        out = h.fail("risky", "Flaky", retryable=True)
        [timer] = [t for t in timers_in(out) if ":retry:" in t.timer_id]
        assert timer.timer_id == f"risky:retry:{attempt}"
        delays.append(timer.due_ms - h.now)
        h.fire(timer.timer_id)
        assert h.pending_for("risky").attempt == attempt + 1
    return delays


@pytest.mark.parametrize("backoff,multiplier,max_backoff,expected", [
    ("1s", 2, "60s", [1000, 2000, 4000, 8000]),
    ("100ms", 3, "1s", [100, 300, 900, 1000]),
    ("2s", 1, "60s", [2000, 2000, 2000, 2000]),
])
def test_without_jitter_the_backoff_is_exactly_exponential_and_capped(backoff, multiplier, max_backoff, expected):
    retry = {"max_attempts": 5, "backoff": backoff, "multiplier": multiplier, "max_backoff": max_backoff, "jitter": False}
    h = Harness(machine_from(flow(retry=retry)))
    h.start("flow", {"q": 1})
    assert _retry_delays(h, 5) == expected


@pytest.mark.parametrize("run_id", [f"run-{i}" for i in range(8)])
def test_jitter_scales_each_delay_by_a_factor_in_0_8_to_1_2_derived_from_the_request(run_id):
    retry = {"max_attempts": 4, "backoff": "10s", "multiplier": 2, "max_backoff": "10m"}
    h = Harness(machine_from(flow(retry=retry)), run_id=run_id)
    h.start("flow", {"q": 1})
    delays = _retry_delays(h, 4)
    for attempt, delay in enumerate(delays, start=1):
        base = 10_000 * 2 ** (attempt - 1)
        assert 0.8 * base <= delay < 1.2 * base
        assert delay == round(base * _jitter(f"{run_id}/risky/{attempt}"))
    # the same run replayed gets the same delays
    again = Harness(machine_from(flow(retry=retry)), run_id=run_id)
    again.start("flow", {"q": 1})
    assert _retry_delays(again, 4) == delays


def test_jitter_spreads_the_retries_of_different_runs():
    retry = {"max_attempts": 2, "backoff": "10s"}
    delays = set()
    for i in range(20):
        h = Harness(machine_from(flow(retry=retry)), run_id=f"run-{i}")
        h.start("flow", {"q": 1})
        delays.update(_retry_delays(h, 2))
    assert len(delays) >= 15


def test_jitter_is_on_by_default():
    assert Retry().jitter is True


def test_a_retry_resends_the_same_input_with_the_next_attempt_and_a_new_deadline():
    h = Harness(machine_from(flow(retry={"max_attempts": 2, "backoff": "1s", "jitter": False}, timeout="5s")))
    [first] = requests_in(h.start("flow", {"q": 1}))
    h.fail(first, "Flaky", retryable=True, now=T0 + 100)
    [second] = requests_in(h.fire("risky:retry:1"))
    assert second.input == first.input and second.attempt == 2 and second.request_id == "r1/risky/2"
    assert second.deadline == T0 + 1_100 + 5_000
    assert "risky:timeout:2" in h.state.timers and "risky:timeout:1" not in h.state.timers


# --- non_retryable --------------------------------------------------------------------------------------


@pytest.mark.parametrize("error_type,retryable,retried", [
    ("RateLimited", True, True),
    ("InvalidInput", True, False),  # listed: fails at once although the worker said retryable
    ("PolicyViolation", True, False),
    ("RateLimited", False, False),  # the worker's own verdict still counts
])
def test_non_retryable_error_types_fail_at_once(error_type, retryable, retried):
    h = Harness(machine_from(flow(retry={"max_attempts": 3, "backoff": "1s"}, non_retryable=["InvalidInput", "PolicyViolation"])))
    h.start("flow", {"q": 1})
    h.fail("risky", error_type, retryable=retryable)
    if retried:
        assert h.state.steps["risky"].status == "waiting_retry"
    else:
        assert h.state.steps["risky"].status == "failed" and h.terminal().event.error.type == error_type
        assert h.state.steps["risky"].attempt == 1


def test_a_non_retryable_error_then_follows_on_error():
    h = Harness(machine_from(flow(FALLBACK, retry={"max_attempts": 3}, non_retryable=["InvalidInput"])))
    h.start("flow", {"q": 1})
    out = h.fail("risky", "InvalidInput", retryable=True)
    assert [r.step_id for r in requests_in(out)] == ["human"]


def test_a_timeout_is_retried_unless_activity_timeout_is_listed_as_non_retryable():
    h = Harness(machine_from(flow(retry={"max_attempts": 3}, non_retryable=["ActivityTimeout"], timeout="1s")))
    h.start("flow", {"q": 1})
    h.fire("risky:timeout:1")
    assert h.state.steps["risky"].status == "timed_out" and h.terminal().event.error.type == "ActivityTimeout"
