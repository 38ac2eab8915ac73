"""Given/when/then tables for parallel joins: all | any | first_success | n_of, join timeouts, per-step and
per-branch failure policies (fail_fast | continue | retry | default), and the cancellation of lost branches."""
from __future__ import annotations

import json
from typing import Any

import pytest

from tests.machine_helpers import Harness, compile_yaml, dump, ignored_in, machine_from, requests_in, succeeded, terminal_events_in
from legato.workflows.machine import BRANCH_ATTEMPTS, CancelRequest
from legato.workflows.model import DefinitionError


def fork(join: Any = "all", on_failure: Any = "fail_fast", timeout: str | None = None, on_timeout: str | None = None, branches: dict[str, Any] | None = None) -> str:
    """Three one-step branches a, b, c (activities a, b, c) then an activity `after` reading the step's output."""
    spec: dict[str, Any] = {"join": join, "on_failure": on_failure}
    if timeout:
        spec["timeout"] = timeout
    if on_timeout:
        spec["on_timeout"] = on_timeout
    spec["branches"] = branches or {n: [{"id": n, "activity": f"work_{n}"}] for n in "abc"}
    doc = {
        "name": "fork",
        "steps": [
            {"id": "p", "parallel": spec},
            {"id": "after", "activity": "after", "input": {"got": "${ steps.p.output }"}},
        ],
    }
    return json.dumps(doc)  # JSON is YAML


def cancels_in(commands) -> list[str]:
    return [c.cancel.request_id for c in commands if isinstance(c, CancelRequest)]


def run_script(h: Harness, script: list[tuple[str, str]]) -> None:
    """Apply ``(step_id, "ok" | "fail")`` completions in order; an "ok" output is ``{"v": step_id}``."""
    for sid, outcome in script:
        if outcome == "ok":
            h.succeed(sid, {"v": sid})
        else:
            h.fail(sid, "Boom", retryable=False)


# given a join and a policy, when branches finish in this order, then the step ends like this
# (status of p after the script, p's output or error type, branches still pending when p ended are cancelled)
JOINS = [
    ("all: every branch", "all", "fail_fast", [("a", "ok"), ("c", "ok"), ("b", "ok")], "succeeded", {"a": {"v": "a"}, "b": {"v": "b"}, "c": {"v": "c"}}, []),
    ("all: a failure fails fast", "all", "fail_fast", [("b", "fail")], "failed", "Boom", ["a", "c"]),
    ("all: continue leaves the failed branch out", "all", "continue", [("a", "fail"), ("b", "ok"), ("c", "ok")], "succeeded", {"b": {"v": "b"}, "c": {"v": "c"}}, []),
    ("all: default stands in for the failed branch", "all", {"default": {"v": "dflt"}}, [("a", "ok"), ("b", "fail"), ("c", "ok")], "succeeded", {"a": {"v": "a"}, "b": {"v": "dflt"}, "c": {"v": "c"}}, []),
    ("any: the first to finish wins", "any", "fail_fast", [("b", "ok")], "succeeded", {"b": {"v": "b"}}, ["a", "c"]),
    ("first_success: failures are passed over", "first_success", "continue", [("a", "fail"), ("c", "ok")], "succeeded", {"c": {"v": "c"}}, ["b"]),
    ("first_success: all failed", "first_success", "continue", [("a", "fail"), ("b", "fail"), ("c", "fail")], "failed", "Boom", []),
    ("first_success: a default counts as a success", "first_success", {"default": 0}, [("a", "fail")], "succeeded", {"a": 0}, ["b", "c"]),
    ("n_of 2: two successes", {"n_of": 2}, "fail_fast", [("c", "ok"), ("a", "ok")], "succeeded", {"a": {"v": "a"}, "c": {"v": "c"}}, ["b"]),
    ("n_of 2: one failure still leaves room", {"n_of": 2}, "continue", [("a", "ok"), ("b", "fail"), ("c", "ok")], "succeeded", {"a": {"v": "a"}, "c": {"v": "c"}}, []),
    ("n_of 2: impossible after two failures", {"n_of": 2}, "continue", [("a", "fail"), ("b", "fail")], "failed", "Boom", ["c"]),
    ("n_of 3 of 3 is all", {"n_of": 3}, "fail_fast", [("a", "ok"), ("b", "ok"), ("c", "ok")], "succeeded", {"a": {"v": "a"}, "b": {"v": "b"}, "c": {"v": "c"}}, []),
]


@pytest.mark.parametrize("name,join,policy,script,status,result,cancelled", JOINS, ids=[j[0] for j in JOINS])
def test_join_table(name, join, policy, script, status, result, cancelled):
    h = Harness(machine_from(fork(join, policy)))
    h.start("fork")
    before = list(h.commands)
    run_script(h, script)
    p = h.state.steps["p"]
    assert p.status == status
    assert sorted(cancels_in(h.commands[len(before):])) == [f"r1/p/{n}/{n}/1" for n in cancelled]
    for n in cancelled:
        assert h.state.steps[f"p/{n}/{n}"].status == "cancelled"
    if status == "succeeded":
        assert p.output == result
        assert list(p.output) == sorted(p.output)  # in the definition's branch order
        assert h.pending_steps() == ["after"]
        assert h.pending_for("after").input == {"got": result}
    else:
        assert h.state.status == "failed" and h.terminal().event.error.type == result
        assert h.state.requests == {} and set(h.state.timers) == {"run:retention"}


@pytest.mark.parametrize("join", ["any", "first_success", {"n_of": 1}])
def test_a_late_completion_of_a_lost_branch_is_ignored_counted_and_changes_nothing(join):
    h = Harness(machine_from(fork(join)))
    [ra, rb, rc] = requests_in(h.start("fork"))
    h.succeed(ra, {"v": "a"})
    snapshot = dump(h.state)
    for late in (succeeded(rb, {"v": "late"}), succeeded(rc, {"v": "late"})):
        out = h.deliver(late)
        [ignored] = ignored_in(out)
        assert ignored.reason in ("duplicate_completion", "stale_attempt") and len(out) == 1
        assert dump(h.state) == snapshot
    assert h.state.steps["p"].output == {"a": {"v": "a"}}


def test_the_join_is_decided_once_even_when_winners_arrive_in_one_decision_each():
    h = Harness(machine_from(fork("any")))
    h.start("fork")
    out = h.succeed("c", {"v": "c"})
    assert [r.step_id for r in requests_in(out)] == ["after"]
    assert sorted(cancels_in(out)) == ["r1/p/a/a/1", "r1/p/b/b/1"]
    assert h.state.steps["p"].output == {"c": {"v": "c"}}


def test_a_cancelled_branch_cancels_every_in_flight_request_inside_it_including_nested_ones():
    wf = """
    name: nested
    steps:
      - id: p
        parallel:
          join: first_success
          branches:
            fast: [{id: fast, activity: f}]
            slow:
              - id: inner
                parallel:
                  branches:
                    x: [{id: x, activity: x}]
                    y: [{id: y, activity: y}]
    """
    h = Harness(machine_from(wf))
    out = h.start("nested")
    assert sorted(r.step_id for r in requests_in(out)) == ["fast", "x", "y"]
    out = h.succeed("fast", 1)
    assert sorted(cancels_in(out)) == ["r1/p/slow/inner/x/x/1", "r1/p/slow/inner/y/y/1"]
    assert h.state.status == "succeeded" and h.state.output == {"fast": 1}
    assert {h.state.steps[k].status for k in ("p/slow/inner/x/x", "p/slow/inner/y/y")} == {"cancelled"}


def test_a_branch_waiting_for_a_retry_is_cancelled_without_a_cancel_request_and_its_timer_dropped():
    branches = {"a": [{"id": "a", "activity": "a"}], "b": [{"id": "b", "activity": "b", "retry": {"max_attempts": 3, "backoff": "5s"}}]}
    h = Harness(machine_from(fork("any", branches=branches)))
    h.start("fork")
    h.fail("b", "Flaky", retryable=True)
    assert "p/b/b:retry:1" in h.state.timers
    out = h.succeed("a", 1)
    assert cancels_in(out) == []  # nothing of b is in flight
    assert h.state.steps["p/b/b"].status == "cancelled"
    assert "p/b/b:retry:1" not in h.state.timers
    assert ignored_in(h.fire("p/b/b:retry:1", now=h.now + 5_000))[0].reason == "stale_timer"


def test_any_is_decided_by_the_first_branch_to_finish_even_a_failed_one():
    """As implemented: `any` takes the first branch to finish; if that one failed (under `continue`) the join
    can no longer be met and the step fails, although other branches are still running. (Use `first_success`
    to pass failures over.)"""
    h = Harness(machine_from(fork("any", "continue")))
    h.start("fork")
    out = h.fail("a", retryable=False)
    assert h.state.steps["p"].status == "failed"
    assert sorted(cancels_in(out)) == ["r1/p/b/b/1", "r1/p/c/c/1"]


# --- join timeout -----------------------------------------------------------------------------------


def test_join_timeout_proceed_continues_with_what_arrived_and_marks_the_rest_timed_out():
    h = Harness(machine_from(fork("all", timeout="10s", on_timeout="proceed")))
    t0 = h.now
    out = h.start("fork")
    assert [(t.timer_id, t.due_ms - t0) for t in out if type(t).__name__ == "StartTimer" and "join" in t.timer_id] == [("p:join_timeout", 10_000)]
    h.succeed("b", {"v": "b"}, now=t0 + 3_000)
    out = h.fire("p:join_timeout")
    assert h.now == t0 + 10_000
    p = h.state.steps["p"]
    assert p.status == "succeeded" and p.output == {"b": {"v": "b"}}
    assert h.state.steps["p/a/a"].status == "timed_out" and h.state.steps["p/c/c"].status == "timed_out"
    assert h.state.view["a"]["status"] == "timed_out"
    assert sorted(cancels_in(out)) == ["r1/p/a/a/1", "r1/p/c/c/1"]
    assert [r.input for r in requests_in(out)] == [{"got": {"b": {"v": "b"}}}]
    # a branch arriving after the timeout is ignored
    late = succeeded(requests_in(h.commands)[0], {"v": "late"})
    assert ignored_in(h.deliver(late))


def test_join_timeout_fail_fails_the_step_with_join_timeout():
    h = Harness(machine_from(fork("all", timeout="10s", on_timeout="fail")))
    h.start("fork")
    h.succeed("a", 1)
    out = h.fire("p:join_timeout")
    assert h.state.steps["p"].status == "timed_out"
    end = h.terminal().event
    assert end.status == "failed" and end.error.type == "JoinTimeout"
    assert "1 of 3" in end.error.message
    assert sorted(cancels_in(out)) == ["r1/p/b/b/1", "r1/p/c/c/1"]


def test_on_timeout_defaults_to_fail():
    h = Harness(machine_from(fork("all", timeout="1s")))
    h.start("fork")
    h.fire("p:join_timeout")
    assert h.terminal().event.error.type == "JoinTimeout"


def test_a_join_that_completes_in_time_clears_its_timer_and_a_later_fire_is_stale():
    h = Harness(machine_from(fork("any", timeout="10s", on_timeout="fail")))
    h.start("fork")
    h.succeed("a", 1)
    assert "p:join_timeout" not in h.state.timers
    [ignored] = ignored_in(h.fire("p:join_timeout", now=h.now + 10_000))
    assert ignored.reason == "stale_timer"
    assert h.pending_steps() == ["after"]


# --- per-branch policies ----------------------------------------------------------------------------


def test_a_branch_policy_overrides_the_step_policy():
    branches = {
        "a": {"on_failure": "continue", "steps": [{"id": "a", "activity": "a"}]},
        "b": {"on_failure": {"default": "B"}, "steps": [{"id": "b", "activity": "b"}]},
        "c": [{"id": "c", "activity": "c"}],
    }
    h = Harness(machine_from(fork("all", "fail_fast", branches=branches)))
    h.start("fork")
    h.fail("a", retryable=False)
    h.fail("b", retryable=False)
    assert h.state.steps["p"].status == "running"
    h.succeed("c", "C")
    assert h.state.steps["p"].output == {"b": "B", "c": "C"}
    # and the step's own fail_fast still holds for the branch without a policy
    h2 = Harness(machine_from(fork("all", "fail_fast", branches=branches)))
    h2.start("fork")
    h2.fail("c", retryable=False)
    assert h2.state.status == "failed"


def test_a_branch_may_be_stricter_than_its_step():
    branches = {"a": {"on_failure": "fail_fast", "steps": [{"id": "a", "activity": "a"}]}, "b": [{"id": "b", "activity": "b"}]}
    h = Harness(machine_from(fork("all", "continue", branches=branches)))
    h.start("fork")
    h.fail("b", retryable=False)
    assert h.state.steps["p"].status == "running"
    out = h.fail("a", retryable=False)
    assert h.state.status == "failed" and h.terminal().event.error.type == "Boom"
    assert terminal_events_in(out)


TWO_STEP_RETRY = {
    "a": {"on_failure": "retry", "steps": [{"id": "a1", "activity": "a1"}, {"id": "a2", "activity": "a2", "input": {"prev": "${ steps.a1.output }"}}]},
    "b": [{"id": "b", "activity": "b"}],
}


def test_retry_reruns_a_failed_branch_from_its_first_step():
    h = Harness(machine_from(fork("all", branches=TWO_STEP_RETRY)))
    h.start("fork")
    h.succeed("a1", "first")
    out = h.fail("a2", retryable=False)
    [again] = requests_in(out)
    assert again.step_id == "a1" and again.request_id == "r1/p/a~2/a1/1"
    h.succeed(again, "second")
    assert h.pending_for("a2").input == {"prev": "second"}
    h.succeed("a2", "A")
    h.succeed("b", "B")
    assert h.state.steps["p"].output == {"a": "A", "b": "B"}
    assert h.pending_steps() == ["after"]


def test_retry_gives_a_branch_branch_attempts_runs_in_all_then_fails_the_step():
    assert BRANCH_ATTEMPTS == 3
    h = Harness(machine_from(fork("all", branches=TWO_STEP_RETRY)))
    h.start("fork")
    starts = []
    for _ in range(BRANCH_ATTEMPTS):
        req = h.pending_for("a1")
        starts.append(req.request_id)
        h.fail(req, retryable=False)
    assert starts == ["r1/p/a/a1/1", "r1/p/a~2/a1/1", "r1/p/a~3/a1/1"]
    assert h.state.status == "failed" and h.terminal().event.error.type == "Boom"
    assert cancels_in(h.last) == ["r1/p/b/b/1"]


def test_a_late_duplicate_from_a_branchs_first_run_is_stale_after_the_branch_ran_again():
    """The first run's frame and steps are dropped when the branch starts again; its requests are still ours."""
    h = Harness(machine_from(fork("all", branches=TWO_STEP_RETRY)))
    h.start("fork")
    first = h.pending_for("a1")
    h.fail(first, retryable=False)
    snapshot = dump(h.state)
    [ignored] = h.deliver(succeeded(first, "late"))
    assert ignored.reason == "stale_attempt" and "ran again" in ignored.detail
    assert dump(h.state) == snapshot


def test_retry_as_the_step_policy_applies_to_every_branch():
    h = Harness(machine_from(fork("all", "retry")))
    h.start("fork")
    h.fail("b", retryable=False)
    assert h.pending_for("b").request_id == "r1/p/b~2/b/1"
    for n in "abc":
        h.succeed(n, n)
    assert h.state.steps["p"].output == {"a": "a", "b": "b", "c": "c"}


# --- end and fail inside branches -----------------------------------------------------------------


def test_a_fail_step_in_a_branch_is_a_branch_failure_subject_to_the_policy():
    branches = {
        "a": [{"id": "a", "activity": "a"}, {"id": "stop", "fail": {"reason": "'bad ' + string(steps.a.output)", "when": "steps.a.output > 1"}}],
        "b": [{"id": "b", "activity": "b"}],
    }
    # continue: the failed branch is left out
    h = Harness(machine_from(fork("all", "continue", branches=branches)))
    h.start("fork")
    h.succeed("a", 5)
    h.succeed("b", "B")
    assert h.state.steps["p"].output == {"b": "B"}
    # fail_fast: the run fails with the fail step's reason
    h = Harness(machine_from(fork("all", "fail_fast", branches=branches)))
    h.start("fork")
    out = h.succeed("a", 5)
    end = h.terminal().event
    assert end.error.type == "WorkflowFailed" and end.error.message == "bad 5"
    assert cancels_in(out) == ["r1/p/b/b/1"]
    # the `when` is false: the branch succeeds with the previous output
    h = Harness(machine_from(fork("all", "fail_fast", branches=branches)))
    h.start("fork")
    h.succeed("a", 1)
    h.succeed("b", "B")
    assert h.state.steps["p"].output == {"a": 1, "b": "B"}


def test_an_end_step_in_a_branch_finishes_the_run_with_its_output_and_cancels_the_rest():
    branches = {
        "a": [{"id": "a", "activity": "a"}, {"id": "done", "end": {"output": "{'early': steps.a.output}"}}],
        "b": [{"id": "b", "activity": "b"}],
    }
    h = Harness(machine_from(fork("all", branches=branches)))
    h.start("fork")
    out = h.succeed("a", 7)
    end = h.terminal().event
    assert end.status == "succeeded" and end.output == {"early": 7}
    assert cancels_in(out) == ["r1/p/b/b/1"]
    assert h.state.requests == {} and set(h.state.timers) == {"run:retention"}


# --- definitions ------------------------------------------------------------------------------------


def test_a_join_larger_than_the_branches_is_refused_with_path_and_reason():
    with pytest.raises(DefinitionError) as caught:
        compile_yaml(fork({"n_of": 4}), "flows/fork.yaml")
    err = caught.value
    assert err.file == "flows/fork.yaml" and err.path == "steps[0].parallel"
    assert "join n_of 4 is larger than the number of branches (3)" in err.reason


@pytest.mark.parametrize("join", [
    {"n_of": 0},
    "most",
    {"n_of": 2, "of": 3},
])
def test_a_malformed_join_is_refused(join):
    with pytest.raises(DefinitionError) as caught:
        compile_yaml(fork(join))
    assert caught.value.path.startswith("steps[0].parallel.join")


def test_a_branch_policy_that_is_not_a_policy_is_refused():
    branches = {"a": {"on_failure": "ignore", "steps": [{"id": "a", "activity": "a"}]}}
    with pytest.raises(DefinitionError) as caught:
        compile_yaml(fork(branches=branches))
    assert caught.value.path.startswith("steps[0].parallel.branches.a")


# unknown step ids read in CEL anywhere a new step kind or option allows an expression
UNKNOWN_REFS = [
    ("end when", [{"id": "e", "end": {"when": "steps.ghost.output", "output": "1"}}], "steps[0].end.when"),
    ("end output", [{"id": "e", "end": {"output": "steps.ghost.output"}}], "steps[0].end.output"),
    ("fail when", [{"id": "f", "fail": {"reason": "'x'", "when": "steps.ghost.ok"}}], "steps[0].fail.when"),
    ("fail reason", [{"id": "f", "fail": {"reason": "steps.ghost.output"}}], "steps[0].fail.reason"),
    ("workflow input", [{"id": "w", "workflow": "child", "input": {"x": "${ steps.ghost.output }"}}], "steps[0].input"),
    ("inside a branch with a policy", [{"id": "p", "parallel": {"branches": {"b": {"on_failure": "continue", "steps": [
        {"id": "a", "activity": "a", "input": {"x": "${ steps.ghost.output }"}}]}}}}], "steps[0].parallel.branches.b.steps[0].input"),
    ("inside a fallback", [{"id": "a", "activity": "a", "on_error": {"fallback": [
        {"id": "b", "activity": "b", "input": {"x": "${ steps.ghost.output }"}}]}}], "steps[0].on_error.fallback[0].input"),
    ("inside on_exhausted", [{"id": "l", "loop": {"max_iterations": 2, "steps": [{"id": "a", "activity": "a"}], "on_exhausted": [
        {"id": "b", "activity": "b", "input": {"x": "${ steps.ghost.output }"}}]}}], "steps[0].loop.on_exhausted[0].input"),
    ("inside map steps", [{"id": "m", "map": {"items": "[1]", "steps": [
        {"id": "b", "activity": "b", "input": {"x": "${ steps.ghost.output }"}}]}}], "steps[0].map.steps[0].input"),
]


@pytest.mark.parametrize("name,steps,path", UNKNOWN_REFS, ids=[u[0] for u in UNKNOWN_REFS])
def test_an_unknown_step_read_in_cel_is_refused_with_its_path(name, steps, path):
    with pytest.raises(DefinitionError) as caught:
        compile_yaml(json.dumps({"name": "w", "steps": steps}), "flows/w.yaml")
    assert caught.value.file == "flows/w.yaml" and caught.value.path == path
    assert "refers to unknown step 'ghost'" in caught.value.reason


def test_duplicate_ids_inside_a_branch_with_a_policy_are_refused_with_the_steps_path():
    branches = {"a": {"on_failure": "retry", "steps": [{"id": "p", "activity": "x"}]}}
    with pytest.raises(DefinitionError) as caught:
        compile_yaml(fork(branches=branches))
    assert caught.value.path == "steps[0].parallel.branches.a.steps[0].id" and "duplicate step id 'p'" in caught.value.reason
