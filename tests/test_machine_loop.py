"""Given/when/then tables for loop steps: until, iteration and previous in scope, exhaustion, timeout, counting."""
from __future__ import annotations

import pytest

from tests.machine_helpers import T0, Harness, dump, fired, machine_from, requests_in, succeeded, terminal_events_in


def looping(max_iterations: int = 4, until: str | None = "steps.attempt.output.score >= 0.9", on_exhausted: str = "fail", timeout: str | None = None) -> str:
    lines = [
        "name: looping",
        "steps:",
        "  - id: l",
        "    loop:",
        f"      max_iterations: {max_iterations}",
        f"      on_exhausted: {on_exhausted}",
    ]
    if until:
        lines.append(f'      until: "{until}"')
    if timeout:
        lines.append(f"      timeout: {timeout}")
    lines += [
        "      steps:",
        "        - id: attempt",
        "          activity: write",
        '          input: {round: "${ iteration }", previous: "${ previous }", topic: "${ input.topic }"}',
    ]
    return "\n".join(lines) + "\n"


def test_the_first_iteration_starts_with_iteration_zero_and_no_previous():
    h = Harness(machine_from(looping()))
    [req] = requests_in(h.start("looping", {"topic": "t"}))
    assert req.input == {"round": 0, "previous": None, "topic": "t"}
    assert req.request_id == "r1/l#0/attempt/1"
    assert h.state.steps["l"].iteration == 0


# given scores, when iteration k is the first to meet `until`, then the loop stops after k+1 iterations
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_until_met_at_iteration_k_stops_the_loop(k):
    h = Harness(machine_from(looping(max_iterations=4)))
    h.start("looping", {"topic": "t"})
    seen = []
    for i in range(k + 1):
        req = h.pending_for("attempt")
        seen.append(req.input["round"])
        score = 0.95 if i == k else 0.1 * i
        h.succeed(req, {"score": score, "i": i})
    assert seen == list(range(k + 1))
    end = h.terminal().event
    assert end.status == "succeeded" and end.output == {"score": 0.95, "i": k}
    assert h.state.steps["l"].iteration == k
    assert set(h.state.timers) == {"run:retention"}


def test_previous_holds_the_last_iterations_output():
    h = Harness(machine_from(looping()))
    h.start("looping", {"topic": "t"})
    previous = []
    for i in range(3):
        req = h.pending_for("attempt")
        previous.append(req.input["previous"])
        h.succeed(req, {"score": 0.0, "draft": f"d{i}"})
    assert previous == [None, {"score": 0.0, "draft": "d0"}, {"score": 0.0, "draft": "d1"}]


def test_iteration_and_previous_are_in_scope_of_until():
    wf = """
name: scope
steps:
  - id: l
    loop:
      max_iterations: 10
      until: "iteration >= 2 && previous != null && previous.v == iteration - 1"
      steps: [{id: s, activity: w}]
"""
    h = Harness(machine_from(wf))
    h.start("scope")
    for i in range(3):
        h.succeed("s", {"v": i})
    assert h.terminal().event.output == {"v": 2}
    assert h.state.steps["l"].iteration == 2


def test_max_iterations_exhausted_fails_with_loop_exhausted_by_default():
    h = Harness(machine_from(looping(max_iterations=3)))
    h.start("looping", {"topic": "t"})
    for _ in range(3):
        out = h.succeed("attempt", {"score": 0.1})
    [end] = terminal_events_in(out)
    assert end.event.type == "run.failed" and end.event.error.type == "LoopExhausted"
    assert "max_iterations" in end.event.error.message and "3 iterations" in end.event.error.message
    assert h.state.steps["l"].status == "failed"
    # finished iterations are dropped from the state (it stays bounded); only the last one's steps remain
    assert [k for k in h.state.steps if k.startswith("l#")] == ["l#2/attempt"]


def test_on_exhausted_continue_succeeds_with_the_last_output():
    h = Harness(machine_from(looping(max_iterations=2, on_exhausted="continue")))
    h.start("looping", {"topic": "t"})
    h.succeed("attempt", {"score": 0.1})
    h.succeed("attempt", {"score": 0.2})
    end = h.terminal().event
    assert end.status == "succeeded" and end.output == {"score": 0.2}
    assert h.state.steps["l"].status == "succeeded"


# a loop without `until` is a counted loop: exactly max_iterations, then it succeeds
@pytest.mark.parametrize("n", [1, 2, 4])
def test_a_counted_loop_without_until_runs_exactly_max_iterations(n):
    h = Harness(machine_from(looping(max_iterations=n, until=None)))
    h.start("looping", {"topic": "t"})
    rounds = []
    while h.status == "running":
        req = h.pending_for("attempt")
        rounds.append(req.input["round"])
        h.succeed(req, {"round": req.input["round"]})
    assert rounds == list(range(n))
    assert h.terminal().event.status == "succeeded" and h.terminal().event.output == {"round": n - 1}


# given a loop timeout, when its timer fires mid-iteration, then the iteration is cancelled and the loop exhausted
@pytest.mark.parametrize("on_exhausted,status,output", [("fail", "failed", None), ("continue", "succeeded", {"score": 0.3})])
def test_the_loop_timeout_timer_ends_the_loop(on_exhausted, status, output):
    h = Harness(machine_from(looping(max_iterations=5, on_exhausted=on_exhausted, timeout="30s")))
    h.start("looping", {"topic": "t"}, now=T0)
    assert h.state.timers["l:loop_timeout"].due_ms == T0 + 30_000
    h.succeed("attempt", {"score": 0.3}, now=T0 + 1_000)
    late = h.pending_for("attempt")
    out = h.fire("l:loop_timeout")
    [end] = terminal_events_in(out)
    assert end.event.status == status and end.event.output == output
    if status == "failed":
        assert end.event.error.type == "LoopExhausted" and "timeout" in end.event.error.message
    assert h.state.steps["l#1/attempt"].status == "cancelled"
    assert h.state.requests == {} and set(h.state.timers) == {"run:retention"}
    before = dump(h.state)
    h.deliver(succeeded(late, {"score": 1.0}))
    assert dump(h.state) == before and len(terminal_events_in(h.commands)) == 1


def test_the_loop_timeout_timer_is_cleared_when_the_loop_ends_and_a_later_fire_is_stale():
    wf = looping(max_iterations=3, timeout="30s") + """  - id: after
    activity: w
"""
    h = Harness(machine_from(wf))
    h.start("looping", {"topic": "t"})
    h.succeed("attempt", {"score": 1.0})
    assert "l:loop_timeout" not in h.state.timers
    assert h.pending_for("after")
    before = h.state
    out = h.deliver(fired("r1", "l:loop_timeout"))
    assert [c.reason for c in out] == ["stale_timer"] and h.state is before


def test_an_until_that_errors_fails_the_run_with_expression_error():
    h = Harness(machine_from(looping(until="steps.attempt.output.missing > 1")))
    h.start("looping", {"topic": "t"})
    h.succeed("attempt", {"score": 0.1})
    end = h.terminal().event
    assert end.error.type == "ExpressionError" and "l" in end.error.message


def test_a_failing_iteration_fails_the_loop():
    h = Harness(machine_from(looping(timeout="1m")))
    h.start("looping", {"topic": "t"})
    h.succeed("attempt", {"score": 0.0})
    h.fail("attempt", "Broken", retryable=False)
    assert h.state.steps["l"].status == "failed" and h.terminal().event.error.type == "Broken"
    assert set(h.state.timers) == {"run:retention"}


def test_nested_loops_have_their_own_iteration_and_the_view_holds_the_latest_result():
    wf = """
name: nested
steps:
  - id: outer
    loop:
      max_iterations: 2
      steps:
        - id: inner
          loop:
            max_iterations: 2
            steps:
              - id: s
                activity: w
                input: {i: "${ iteration }"}
"""
    h = Harness(machine_from(wf))
    h.start("nested")
    keys = []
    while h.status == "running":
        req = h.pending_for("s")
        keys.append((req.request_id, req.input["i"]))
        h.succeed(req, req.input["i"])
    assert keys == [
        ("r1/outer#0/inner#0/s/1", 0),
        ("r1/outer#0/inner#1/s/1", 1),
        ("r1/outer#1/inner#0/s/1", 0),
        ("r1/outer#1/inner#1/s/1", 1),
    ]
    assert h.terminal().event.output == 1


def test_a_loop_with_a_choice_records_the_path_of_every_iteration():
    wf = """
name: loopchoice
steps:
  - id: l
    loop:
      max_iterations: 3
      steps:
        - id: c
          choice:
            cases: [{when: "iteration == 1", steps: [{id: odd, activity: w}]}]
            default: [{id: even, activity: w}]
"""
    h = Harness(machine_from(wf))
    h.start("loopchoice")
    for step_id in ("even", "odd", "even"):
        h.succeed(step_id, step_id)
    assert h.terminal().event.path == ["c:default", "c:case0", "c:default"]


def test_a_loop_whose_body_needs_no_activity_runs_to_the_engine_cap_without_overflowing_the_stack():
    """Regression: a loop body that completes within the same decision (here a `fail` whose `when` is false, so
    it is skipped) made each iteration recurse (advance -> _start_step -> finish_step -> _frame_finished ->
    _loop_iteration_finished -> advance ...); above ~165 iterations ``decide`` raised RecursionError."""
    wf = """
name: spin
steps:
  - id: l
    loop:
      max_iterations: 1000
      steps:
        - id: guard
          fail: {reason: "'never'", when: "false"}
"""
    h = Harness(machine_from(wf))
    try:
        h.start("spin")
    except RecursionError:
        pytest.fail("decide() raised RecursionError on a 1000-iteration loop with an activity-free body")
    assert h.status == "succeeded"
    assert h.state.steps["l"].iteration == 999 and [k for k in h.state.steps if k.endswith("/guard")] == ["l#999/guard"]
