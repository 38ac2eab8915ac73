"""Given/when/then tables for redrive inside compound steps: a failed run resumes from the steps that failed, timed
out or were cancelled by the failure, wherever they are (a parallel branch, a map item, a loop iteration, a choice's
path, fallback steps); steps that succeeded keep their outputs and are not requested again; attempts continue."""
from __future__ import annotations

from collections import Counter

import pytest

from legato.topics.models import ChildRunFinished, RunRedriveRequested, SignalSent
from legato.workflows import keys
from legato.workflows.machine import Machine, StartChildRun, redrive_target
from tests.machine_helpers import T0, Harness, compile_yaml, fired, ignored_in, machine_from, requests_in, run_events_in, terminal_events_in


def redrive(h: Harness, now: int | None = None):
    return h.deliver(RunRedriveRequested(run_id=h.run_id, reason="fixed"), now)


def requested(h: Harness) -> Counter:
    """How often each step key was requested over the whole run (every attempt counts)."""
    return Counter(r.request_id.rsplit("/", 1)[0].removeprefix(f"{h.run_id}/") for r in requests_in(h.commands))


def request_ids(commands) -> list[str]:
    return sorted(r.request_id for r in requests_in(commands))


def ends(h: Harness) -> list[tuple[str, int | None]]:
    return [(e.event.type, e.event.redrives) for e in run_events_in(h.commands)]


def refusal(h: Harness) -> str:
    before = h.state
    [refused] = ignored_in(out := redrive(h))
    assert len(out) == 1 and refused.reason == "redrive_refused" and h.state == before
    return refused.detail


PARALLEL = """
name: par
timeout: 1m
steps:
  - id: p
    parallel:
      branches:
        a: [{id: a1, activity: w}, {id: a2, activity: w}]
        b: [{id: b1, activity: w}]
        c: [{id: c1, activity: w}]
  - id: after
    activity: w
output: "{'p': steps.p.output, 'after': steps.after.output}"
"""


def test_a_parallel_resumes_the_failed_branch_and_the_ones_cancelled_by_it_not_the_one_that_succeeded():
    h = Harness(machine_from(PARALLEL))
    h.start("par", now=T0)
    h.succeed("c1", "C")
    h.succeed("a1", "A1")
    h.fail("b1", "Bad", retryable=False)  # fail_fast: a2 (in flight) is cancelled
    assert h.status == "failed" and h.state.steps["p/a/a2"].status == "cancelled"
    out = redrive(h, now=T0 + 5_000)
    assert request_ids(out) == ["r1/p/a/a2/2", "r1/p/b/b1/2"]
    assert h.status == "running" and h.state.timers.keys() == {"run:timeout~1", "p/a/a2:timeout:2", "p/b/b1:timeout:2"}
    h.succeed("b1", "B")
    h.succeed("a2", "A2")
    h.succeed("after", "done")
    assert requested(h) == {"p/a/a1": 1, "p/a/a2": 2, "p/b/b1": 2, "p/c/c1": 1, "after": 1}
    assert ends(h) == [("run.started", None), ("run.failed", None), ("run.redriven", 1), ("run.completed", 1)]
    assert h.state.output == {"p": {"a": "A2", "b": "B", "c": "C"}, "after": "done"}


def test_a_branch_that_failed_under_continue_is_no_longer_counted_when_it_runs_again():
    h = Harness(machine_from("""
        name: par
        steps:
          - id: p
            parallel:
              on_failure: continue
              join: {n_of: 2}
              branches:
                a: [{id: a1, activity: w}]
                b: [{id: b1, activity: w}]
        output: "steps.p.output"
        """))
    h.start("par")
    h.succeed("a1", "A")
    h.fail("b1", retryable=False)
    assert h.status == "failed" and h.state.error.type == "Boom"  # too few succeeded for the join
    assert request_ids(redrive(h)) == ["r1/p/b/b1/2"]
    assert (h.state.steps["p"].done_n, h.state.steps["p"].failed_n, h.state.steps["p"].error) == (1, 0, None)
    h.succeed("b1", "B")
    assert h.status == "succeeded" and h.state.output == {"a": "A", "b": "B"}


MAP = """
name: mapping
steps:
  - id: m
    map:
      items: input.xs
      max_concurrency: 2
      steps: [{id: work, activity: w, input: {x: "${ item }"}}]
output: "steps.m.output"
"""


def test_a_map_resumes_the_failed_item_and_the_cancelled_ones_and_then_starts_the_items_not_started():
    h = Harness(machine_from(MAP))
    h.start("mapping", {"xs": [10, 11, 12, 13]})
    [first, second] = sorted(h.pending(), key=lambda r: r.request_id)
    h.succeed(first, 100)  # item 0; item 2 starts
    h.fail(second, "Bad", retryable=False)  # item 1 fails; item 2 (in flight) is cancelled; item 3 never started
    assert h.status == "failed" and h.state.steps["m"].next_index == 3
    assert request_ids(redrive(h)) == ["r1/m[1]/work/2", "r1/m[2]/work/2"]
    for request in sorted(h.pending(), key=lambda r: r.request_id):
        h.succeed(request, request.input["x"] * 10)
    [last] = h.pending()
    assert (last.request_id, last.attempt) == ("r1/m[3]/work/1", 1)
    h.succeed(last, 130)
    assert h.status == "succeeded" and h.state.output == [100, 110, 120, 130]
    assert requested(h) == {"m[0]/work": 1, "m[1]/work": 2, "m[2]/work": 2, "m[3]/work": 1}


def test_map_items_that_failed_under_continue_start_again_in_frames_of_their_own_within_max_concurrency():
    h = Harness(machine_from("""
        name: mapping
        steps:
          - id: m
            map:
              items: input.xs
              max_concurrency: 1
              on_failure: continue
              join: {n_of: 2}
              steps: [{id: work, activity: w, input: {x: "${ item }"}}]
        output: "steps.m.output"
        """))
    h.start("mapping", {"xs": ["a", "b", "c"]})
    h.fail("work", retryable=False)  # item 0: counted, its frame dropped; item 1 starts
    h.fail("work", retryable=False)  # item 1: now 2 of 3 cannot succeed
    assert h.status == "failed" and h.state.error.type == "Boom" and h.state.steps["m"].failed_n == 2
    assert request_ids(redrive(h)) == ["r1/m[0]~r1/work/1"]  # one at a time, in item order
    assert (h.state.steps["m"].failed_n, h.state.steps["m"].done_n, h.state.steps["m"].redo) == (0, 0, [1])
    h.succeed("work", "A")
    assert [r.request_id for r in h.pending()] == ["r1/m[1]~r1/work/1"]
    h.succeed("work", "B")
    assert h.status == "succeeded" and h.state.output == ["A", "B", None]  # the join needed two: item 2 never ran


def test_map_items_a_redrive_had_no_room_to_start_yet_wait_for_the_next_redrive_and_are_counted_once():
    h = Harness(machine_from("""
        name: mapping
        steps:
          - id: m
            map: {items: input.xs, max_concurrency: 1, on_failure: continue, join: {n_of: 2}, timeout: 10s, steps: [{id: work, activity: w}]}
        output: "steps.m.output"
        """))
    h.start("mapping", {"xs": ["a", "b", "c"]}, now=T0)
    h.fail("work", retryable=False)
    h.fail("work", retryable=False)  # items 0 and 1 failed: 2 of 3 can no longer succeed
    assert request_ids(redrive(h, now=T0 + 1_000)) == ["r1/m[0]~r1/work/1"]
    h.fire(keys.join_timeout("m", 1))  # item 0 (again) is cancelled; item 1 never started again
    m = h.state.steps["m"]
    assert (h.status, h.state.error.type, m.failed_n, m.done_n, m.redo) == ("failed", "JoinTimeout", 0, 0, [1])
    assert request_ids(redrive(h)) == ["r1/m[0]~r1/work/2"]  # the cancelled item resumes; item 1 still waits for room
    h.succeed("work", "A")
    assert [r.request_id for r in h.pending()] == ["r1/m[1]~r2/work/1"]
    h.succeed("work", "B")
    assert h.status == "succeeded" and h.state.output == ["A", "B", None]
    assert [e.event.redrives for e in terminal_events_in(h.commands)] == [None, 1, 2]


LOOP = """
name: looping
steps:
  - id: l
    loop:
      max_iterations: 5
      until: "steps.review.output.ok"
      timeout: 1m
      steps:
        - {id: draft, activity: w, input: {round: "${ iteration }", previous: "${ previous }"}}
        - {id: review, activity: w}
output: "steps.l.output"
"""


def test_a_loop_resumes_its_failed_iteration_from_its_failed_step_with_its_counters_intact():
    h = Harness(machine_from(LOOP))
    h.start("looping", now=T0)
    h.succeed("draft", "d0")
    h.succeed("review", {"ok": False})
    assert h.pending_for("draft").input == {"round": 1, "previous": {"ok": False}}
    h.succeed("draft", "d1")
    h.fail("review", "Bad", retryable=False)
    assert h.status == "failed" and h.state.steps["l"].ended_by == "failed"
    out = redrive(h, now=T0 + 9_000)
    assert request_ids(out) == ["r1/l#1/review/2"]
    loop = h.state.steps["l"]
    assert (loop.status, loop.iteration, loop.ended_by) == ("running", 1, None)
    assert h.state.timers[keys.loop_timeout("l", 1)].due_ms == T0 + 9_000 + 60_000  # the loop's timeout restarts
    h.succeed("review", {"ok": True})
    assert h.status == "succeeded" and h.state.output == {"ok": True} and h.state.steps["l"].ended_by == "until"
    assert requested(h) == {"l#0/draft": 1, "l#0/review": 1, "l#1/draft": 1, "l#1/review": 2}
    assert [e.event.redrives for e in terminal_events_in(h.commands)] == [None, 1]


def test_a_loop_that_timed_out_resumes_the_iteration_the_timeout_cancelled():
    h = Harness(machine_from(LOOP))
    h.start("looping", now=T0)
    h.fire(keys.loop_timeout("l"))
    assert h.status == "failed" and h.state.error.type == "LoopExhausted"
    assert request_ids(redrive(h)) == ["r1/l#0/draft/2"]
    assert [i.reason for i in ignored_in(h.deliver(fired("r1", keys.loop_timeout("l"))))] == ["stale_timer"]  # a copy of the old one
    h.succeed("draft", "d")
    h.succeed("review", {"ok": True})
    assert h.status == "succeeded"


CHOICE = """
name: choosing
steps:
  - id: c
    choice:
      cases:
        - when: "input.n > 1"
          steps: [{id: x, activity: w}, {id: y, activity: w}]
      default: [{id: z, activity: w}]
  - id: after
    activity: w
"""


def test_a_choice_resumes_the_failed_step_of_the_path_it_took_without_choosing_again():
    h = Harness(machine_from(CHOICE))
    h.start("choosing", {"n": 2})
    h.succeed("x", "X")
    h.fail("y", retryable=False)
    assert h.status == "failed" and h.state.path == ["c:case0"]
    assert request_ids(redrive(h)) == ["r1/c/case0/y/2"]
    h.succeed("y", "Y")
    h.succeed("after", "A")
    assert h.status == "succeeded" and h.state.path == ["c:case0"]
    assert requested(h) == {"c/case0/x": 1, "c/case0/y": 2, "after": 1}


FALLBACK = """
name: rescued
steps:
  - id: s
    activity: w
    on_error:
      fallback: [{id: r1, activity: rescue}, {id: r2, activity: rescue}]
  - id: after
    activity: w
    input: {got: "${ steps.s.output }"}
"""


def test_failed_fallback_steps_resume_from_their_failed_step_and_the_step_they_stand_in_for_is_not_run_again():
    h = Harness(machine_from(FALLBACK))
    h.start("rescued")
    h.fail("s", "Bad", retryable=False)
    h.succeed("r1", "R1")
    h.fail("r2", "Worse", retryable=False)
    assert h.status == "failed" and h.state.error.type == "Worse"
    assert request_ids(redrive(h)) == ["r1/s/fallback/r2/2"]
    h.succeed("r2", "R2")
    assert h.pending_for("after").input == {"got": "R2"}
    h.succeed("after")
    assert h.status == "succeeded" and requested(h) == {"s": 1, "s/fallback/r1": 1, "s/fallback/r2": 2, "after": 1}


def test_the_fallback_of_a_parallel_resumes_not_its_branches():
    h = Harness(machine_from("""
        name: par
        steps:
          - id: p
            parallel:
              branches:
                a: [{id: a1, activity: w}]
                b: [{id: b1, activity: w}]
            on_error:
              fallback: [{id: plan_b, activity: w}]
        """))
    h.start("par")
    h.fail("a1", retryable=False)  # b1 is cancelled, the fallback starts
    h.fail("plan_b", retryable=False)
    assert h.status == "failed"
    assert request_ids(redrive(h)) == ["r1/p/fallback/plan_b/2"]
    h.succeed("plan_b", "B")
    assert h.status == "succeeded" and h.state.steps["p/b/b1"].status == "cancelled"


def test_nested_steps_resume_at_every_level_a_wait_cancelled_by_a_sibling_waits_again_a_child_run_starts_fresh():
    h = Harness(machine_from("""
        name: nested
        steps:
          - id: l
            loop:
              max_iterations: 3
              steps:
                - id: p
                  parallel:
                    branches:
                      waits: [{id: approval, wait: {signal: ok}}]
                      sub: [{id: child, workflow: kid}]
                      fails: [{id: f1, activity: w}]
        output: "steps.l.output"
        """, "name: kid\nsteps: [{id: k, activity: w}]\n"))
    [child] = [c.accepted for c in h.start("nested") if isinstance(c, StartChildRun)]
    h.fail("f1", retryable=False)
    assert h.status == "failed" and h.state.steps["l#0/p/waits/approval"].status == "cancelled"
    out = redrive(h)
    [fresh] = [c.accepted for c in out if isinstance(c, StartChildRun)]
    assert (child.run_id, fresh.run_id) == ("r1/l#0/p/sub/child", "r1/l#0/p/sub/child~1")
    assert request_ids(out) == ["r1/l#0/p/fails/f1/2"] and h.state.steps["l#0/p/waits/approval"].status == "waiting"
    h.deliver(SignalSent(run_id="r1", signal="ok", data="yes"))
    h.deliver(ChildRunFinished(run_id="r1", step_key="l#0/p/sub/child", child_run_id=fresh.run_id, status="succeeded", output="kid"))
    h.succeed("f1", "F")
    assert h.status == "running" and h.state.steps["l"].iteration == 1  # the loop went on to its next iteration
    assert [e.event.type for e in terminal_events_in(h.commands)] == ["run.failed"]


def test_a_run_that_timed_out_inside_compound_steps_resumes_what_was_in_flight():
    h = Harness(machine_from(PARALLEL))
    h.start("par", now=T0)
    h.succeed("c1", "C")
    h.fire("run:timeout")  # a1 and b1 are cancelled; the parallel is left running with its frames closed
    assert h.status == "failed" and h.state.error.type == "RunTimeout" and h.state.steps["p"].status == "running"
    assert request_ids(redrive(h, now=T0 + 70_000)) == ["r1/p/a/a1/2", "r1/p/b/b1/2"]
    h.succeed("a1", "A1")
    h.succeed("a2", "A2")
    h.succeed("b1", "B")
    h.succeed("after", "done")
    assert h.status == "succeeded" and h.state.output["p"] == {"a": "A2", "b": "B", "c": "C"}


def test_a_join_timeout_restarts_and_a_copy_of_the_old_one_is_stale():
    h = Harness(machine_from("""
        name: par
        steps:
          - id: p
            parallel:
              timeout: 10s
              branches:
                a: [{id: a1, activity: w}]
                b: [{id: b1, activity: w}]
        """))
    h.start("par", now=T0)
    h.succeed("a1", "A")
    h.fire(keys.join_timeout("p"))
    assert h.status == "failed" and h.state.error.type == "JoinTimeout" and h.state.steps["p/b/b1"].status == "timed_out"
    assert request_ids(redrive(h, now=T0 + 60_000)) == ["r1/p/b/b1/2"]
    assert h.state.timers[keys.join_timeout("p", 1)].due_ms == T0 + 70_000
    assert [i.reason for i in ignored_in(h.deliver(fired("r1", keys.join_timeout("p"))))] == ["stale_timer"]
    h.succeed("b1", "B")
    assert h.status == "succeeded" and h.state.steps["p"].output == {"a": "A", "b": "B"}


def test_a_redriven_compound_run_that_fails_again_continues_its_attempts_at_the_next_redrive():
    h = Harness(machine_from(MAP))
    h.start("mapping", {"xs": [1]})
    h.fail("work", retryable=False)
    redrive(h)
    h.fail("work", retryable=False)
    assert request_ids(redrive(h)) == ["r1/m[0]/work/3"] and h.state.redrives == 2
    h.succeed("work", 9)
    assert [e.event.redrives for e in terminal_events_in(h.commands)] == [None, 1, 2]


# --- what is still refused, and why --------------------------------------------------------------


@pytest.mark.parametrize("doc,fail,detail", [
    ("""
     name: x
     steps:
       - id: c
         choice:
           cases: [{when: "input.n > 1", steps: [{id: a, activity: w}, {id: stop, fail: {reason: "'no'"}}]}]
           default: [{id: d, activity: w}]
     """, "", "the run ended at its fail step 'stop' (no): it would end there again: trigger the run again"),
    ("""
     name: x
     steps:
       - id: l
         loop: {max_iterations: 1, until: "false", on_exhausted: fail, steps: [{id: a, activity: w}]}
     """, "", "the loop 'l' ended by max_iterations (LoopExhausted: loop l reached max_iterations after 1 iterations without meeting `until`), "
              "not in a step of its body: it would end the same way again: trigger the run again"),
    ("""
     name: x
     steps:
       - id: p
         parallel: {branches: {a: [{id: a, activity: w}, {id: b, activity: w, input: {v: "${ steps.a.output.missing }"}}]}}
     """, "", "step 'p/a/b' failed on an expression"),
])
def test_what_would_fail_the_same_way_again_is_refused_with_the_reason(doc, fail, detail):
    h = Harness(machine_from(doc))
    h.start("x", {"n": 2, "xs": [1, 2]})
    while h.status == "running":
        request = h.pending()[0]
        if request.step_id == fail:
            h.fail(request, retryable=False)
        else:
            h.succeed(request, {"ok": 1})
    assert h.status == "failed"
    assert refusal(h).startswith(detail)
    assert isinstance(redrive_target(h.state, h.machine.pinned(h.state)), str)


def test_a_child_run_that_failed_on_an_expression_is_started_fresh_its_outputs_may_differ_now():
    h = Harness(machine_from("name: parent\nsteps: [{id: sub, workflow: kid}]\n", "name: kid\nsteps: [{id: k, activity: w}]\n"))
    [first] = [c.accepted for c in h.start("parent") if isinstance(c, StartChildRun)]
    error = {"type": "ExpressionError", "message": "step k2: no such key: missing", "retryable": False}
    h.deliver(ChildRunFinished(run_id="r1", step_key="sub", child_run_id=first.run_id, status="failed", error=error))
    assert h.status == "failed" and h.state.error.type == "ExpressionError"
    [fresh] = [c.accepted for c in redrive(h) if isinstance(c, StartChildRun)]
    assert fresh.run_id == "r1/sub~1"


def test_a_run_whose_state_outgrew_its_limit_is_refused_its_outputs_were_shed():
    doc = "name: big\nsteps: [{id: m, map: {items: input.xs, steps: [{id: i, activity: w}]}}]\n"
    h = Harness(Machine({"big": compile_yaml(doc)}, max_state_bytes=30_000))
    # an input that fits, which the map copies into its item list and every item's frame: no output to refuse
    h.start("big", {"xs": ["x" * 400 for _ in range(40)]})
    assert h.state.error.type == "ContextTooLarge" and "the run's state grew" in h.state.error.message
    assert len(h.state.encoded()) <= 30_000  # shed: the stored document fits again
    assert refusal(h) == "the run's state outgrew its limit and its outputs were shed: trigger it again"


def test_a_map_whose_joined_output_the_state_cannot_hold_fails_with_context_too_large_instead_of_being_stored():
    """BUG (found with the stored-size measure): a map's output, the list of every item's result, was copied into
    the step, the CEL view and the frame without counting towards the size estimate, and a run that finished with it
    was never measured: 40 results of 500 bytes, each accepted, made a 102 KB state stored under a 30 KB limit."""
    doc = "name: big\nsteps: [{id: m, map: {items: input.xs, steps: [{id: i, activity: w}]}}]\n"
    h = Harness(Machine({"big": compile_yaml(doc)}, max_state_bytes=30_000))
    h.start("big", {"xs": list(range(40))})
    while h.status == "running":
        h.succeed(h.pending()[0], "y" * 500)
    assert h.state.steps["m"].status == "failed" and h.state.steps["m"].error.type == "ContextTooLarge"
    assert "would grow the run's state" in h.state.steps["m"].error.message
    assert h.state.status == "failed" and len(h.state.encoded()) <= 30_000


def test_a_run_that_finishes_with_an_output_its_state_cannot_hold_a_fourth_time_is_stored_under_the_limit():
    """An accepted output is held three times (the step, the CEL view, the frame); the run's own output is a fourth
    copy, and a finished run was never measured: its stored state could pass the limit the changelog record must
    keep. Now it is measured, and a finished state over the limit sheds the copies (its terminal event keeps the
    output)."""
    limit = 30_000
    h = Harness(Machine({"one": compile_yaml("name: one\nsteps: [{id: a, activity: w}]\n")}, max_state_bytes=limit))
    h.start("one")
    big = "z" * 8_500  # 3 copies fit in 30,000 bytes, 4 do not
    h.succeed("a", big)
    assert h.status == "succeeded" and h.terminal().event.output == big
    assert len(h.state.encoded()) <= limit
    assert h.state.output == big and h.state.steps["a"].output is None  # the copies went, the run's output stayed
