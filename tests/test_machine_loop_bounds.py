"""Given/when/then tables for how loops end: the default and capped bounds, until, timeout, no_progress,
on_exhausted (fail | continue | steps), for_each with batch_size, budget, failure, and step.ended_by for each."""
from __future__ import annotations

import json
from typing import Any

import pytest

from tests.machine_helpers import Harness, compile_yaml, ignored_in, machine_from, requests_in, succeeded, terminal_events_in
from legato.workflows.machine import CancelRequest, Machine
from legato.workflows.model import DEFAULT_MAX_ITERATIONS, ENGINE_MAX_ITERATIONS, DefinitionError


def loop_doc(after: bool = False, **loop: Any) -> str:
    loop.setdefault("steps", [{"id": "body", "activity": "body", "input": {"i": "${ iteration }", "prev": "${ previous }"}}])
    doc: dict[str, Any] = {"name": "lp", "steps": [{"id": "l", "loop": loop}]}
    if after:
        doc["steps"].append({"id": "after", "activity": "after", "input": {"got": "${ steps.l.output }"}})
    return json.dumps(doc)


def drive(h: Harness, outputs) -> list[dict[str, Any]]:
    """Answer `body` requests with ``outputs(i, request)`` while the run is running; return the inputs seen."""
    seen = []
    i = 0
    while h.status == "running" and any(r.step_id == "body" for r in h.pending()):
        req = h.pending_for("body")
        seen.append(req.input)
        h.succeed(req, outputs(i, req))
        i += 1
    return seen


def cancels_in(commands) -> list[str]:
    return [c.cancel.request_id for c in commands if isinstance(c, CancelRequest)]


# --- the default bound and the cap --------------------------------------------------------------------


def test_a_loop_without_max_iterations_compiles_with_the_default_bound():
    """Regression: at commit 399678d the compiler did ``spec.max_iterations > ENGINE_MAX_ITERATIONS`` and a loop
    without max_iterations crashed it with ``TypeError: '>' not supported between 'NoneType' and 'int'`` (not a
    DefinitionError). Fixed in the working tree (``is not None and ...``)."""
    wf = compile_yaml(loop_doc(until="steps.body.output.done"))
    assert wf.steps["l"].loop.max_iterations is None
    assert wf.steps["l"].loop.bound == DEFAULT_MAX_ITERATIONS
    wf = compile_yaml(loop_doc(for_each="input.xs"))
    assert wf.steps["l"].loop.max_iterations is None


def test_without_max_iterations_a_loop_stops_after_the_default_bound():
    wf = compile_yaml(loop_doc(until="steps.body.output.done"))
    h = Harness(Machine({"lp": wf}))
    h.start("lp")
    seen = drive(h, lambda i, r: {"done": False, "i": i})
    assert len(seen) == DEFAULT_MAX_ITERATIONS == 100
    assert h.state.steps["l"].ended_by == "max_iterations"
    assert h.terminal().event.error.type == "LoopExhausted"


def test_without_max_iterations_a_counted_loop_runs_the_default_bound_and_succeeds():
    wf = compile_yaml(loop_doc())
    h = Harness(Machine({"lp": wf}))
    h.start("lp")
    seen = drive(h, lambda i, r: i)
    assert [s["i"] for s in seen] == list(range(100))
    assert h.terminal().event.output == 99


@pytest.mark.parametrize("extra", [{}, {"for_each": "input.xs"}, {"until": "true"}])
def test_a_bound_above_the_engine_cap_is_refused_for_every_kind_of_loop(extra):
    with pytest.raises(DefinitionError) as caught:
        compile_yaml(loop_doc(max_iterations=ENGINE_MAX_ITERATIONS + 1, **extra), "f.yaml")
    assert caught.value.path == "steps[0].loop.max_iterations"
    assert f"above the engine cap of {ENGINE_MAX_ITERATIONS}" in caught.value.reason


@pytest.mark.parametrize("field,value,path", [
    ("no_progress", 0, "steps[0].loop.no_progress"),
    ("batch_size", 0, "steps[0].loop.batch_size"),
    ("for_each", "steps.ghost.output", "steps[0].loop.for_each"),
    ("for_each", "input.xs[", "steps[0].loop.for_each"),
    ("on_exhausted", "retry", "steps[0].loop.on_exhausted"),
    ("on_exhausted", [], "steps[0].loop.on_exhausted"),
])
def test_bad_loop_options_are_refused_with_a_path(field, value, path):
    with pytest.raises(DefinitionError) as caught:
        compile_yaml(loop_doc(max_iterations=3, **{field: value}))
    assert caught.value.path == path


def test_duplicate_ids_in_on_exhausted_steps_are_refused():
    with pytest.raises(DefinitionError) as caught:
        compile_yaml(loop_doc(max_iterations=3, on_exhausted=[{"id": "body", "activity": "x"}]))
    assert caught.value.path == "steps[0].loop.on_exhausted[0].id" and "duplicate step id 'body'" in caught.value.reason


# --- no_progress --------------------------------------------------------------------------------------


# given no_progress K, when the body's outputs are these, then the loop stops after this many iterations
@pytest.mark.parametrize("k,outputs,iterations", [
    (1, ["a", "a"], 2),
    (2, ["a", "a", "a"], 3),
    (2, ["a", "a", "b", "b", "b"], 5),  # a change resets the count
    (3, ["a", "b", "a", "b", "a", "b", "a", "b", "a", "b"], 10),  # never unchanged: runs to max_iterations
])
def test_no_progress_stops_after_k_unchanged_iterations_in_a_row(k, outputs, iterations):
    h = Harness(machine_from(loop_doc(max_iterations=10, until="steps.body.output == 'done'", no_progress=k, on_exhausted="continue")))
    h.start("lp")
    seen = drive(h, lambda i, r: outputs[i])
    assert len(seen) == iterations
    step = h.state.steps["l"]
    assert step.ended_by == ("no_progress" if iterations < 10 else "max_iterations")
    assert h.terminal().event.output == outputs[iterations - 1]


@pytest.mark.parametrize("on_exhausted,status,output,error", [
    ("fail", "failed", None, "LoopExhausted"),
    ("continue", "succeeded", {"v": 1}, None),
])
def test_no_progress_then_on_exhausted_applies(on_exhausted, status, output, error):
    h = Harness(machine_from(loop_doc(max_iterations=10, until="steps.body.output.v > 5", no_progress=2, on_exhausted=on_exhausted)))
    h.start("lp")
    drive(h, lambda i, r: {"v": 1})
    end = h.terminal().event
    assert h.state.steps["l"].ended_by == "no_progress"
    assert end.status == status and end.output == output
    if error:
        assert end.error.type == error and "no_progress" in end.error.message


def test_no_progress_works_on_a_loop_without_until():
    h = Harness(machine_from(loop_doc(max_iterations=10, no_progress=1, on_exhausted="continue")))
    h.start("lp")
    seen = drive(h, lambda i, r: min(i, 3))  # 0 1 2 3 3
    assert len(seen) == 5 and h.state.steps["l"].ended_by == "no_progress"


# --- on_exhausted steps -------------------------------------------------------------------------------


@pytest.mark.parametrize("bound", ["max_iterations", "no_progress", "timeout"])
def test_on_exhausted_steps_run_with_previous_and_give_the_loop_its_output(bound):
    options: dict[str, Any] = {"max_iterations": 3, "until": "steps.body.output.score > 0.9",
                               "on_exhausted": [{"id": "escalate", "activity": "human_review", "input": {"last": "${ previous }"}}]}
    if bound == "no_progress":
        options["no_progress"] = 1
    if bound == "timeout":
        options["timeout"] = "1m"
    h = Harness(machine_from(loop_doc(after=True, **options)))
    h.start("lp")
    if bound == "timeout":
        h.succeed("body", {"score": 0.1}, now=h.now + 1_000)
        out = h.fire("l:loop_timeout")
        assert cancels_in(out) == ["r1/l#1/body/1"]
    else:
        drive(h, lambda i, r: {"score": 0.1} if bound == "no_progress" else {"score": 0.1 * i})
    last = {"score": 0.1} if bound != "max_iterations" else {"score": 0.2}
    review = h.pending_for("escalate")
    assert review.input == {"last": last}
    assert h.state.steps["l"].status == "running" and h.state.steps["l"].ended_by == bound
    h.succeed(review, {"approved": True})
    assert h.state.steps["l"].status == "succeeded" and h.state.steps["l"].output == {"approved": True}
    assert h.pending_for("after").input == {"got": {"approved": True}}


def test_failing_on_exhausted_steps_fail_the_loop():
    h = Harness(machine_from(loop_doc(max_iterations=1, until="false", on_exhausted=[{"id": "escalate", "activity": "human_review"}])))
    h.start("lp")
    h.succeed("body", 1)
    h.fail("escalate", "Rejected", retryable=False)
    assert h.state.steps["l"].status == "failed" and h.terminal().event.error.type == "Rejected"


# --- for_each -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xs,batch,batches", [
    ([1, 2, 3, 4, 5], 2, [[1, 2], [3, 4], [5]]),
    ([1, 2, 3], 1, [[1], [2], [3]]),
    ([1, 2, 3], 3, [[1, 2, 3]]),
    ([1, 2], 10, [[1, 2]]),
])
def test_for_each_runs_the_batches_in_order(xs, batch, batches):
    body = [{"id": "body", "activity": "body", "input": {"batch": "${ item }", "index": "${ index }", "i": "${ iteration }", "prev": "${ previous }"}}]
    h = Harness(machine_from(loop_doc(max_iterations=10, for_each="input.xs", batch_size=batch, steps=body)))
    h.start("lp", {"xs": xs})
    seen = drive(h, lambda i, r: {"sum": sum(r.input["batch"])})
    assert [s["batch"] for s in seen] == batches
    assert [s["index"] for s in seen] == list(range(len(batches))) == [s["i"] for s in seen]
    assert [s["prev"] for s in seen] == [None] + [{"sum": sum(b)} for b in batches[:-1]]
    assert h.state.steps["l"].ended_by == "items"
    assert h.terminal().event.output == {"sum": sum(batches[-1])}


def test_for_each_over_an_empty_list_ends_at_once_by_items():
    h = Harness(machine_from(loop_doc(after=True, max_iterations=10, for_each="input.xs")))
    out = h.start("lp", {"xs": []})
    assert h.state.steps["l"].ended_by == "items" and h.state.steps["l"].status == "succeeded"
    assert [r.step_id for r in requests_in(out)] == ["after"]


@pytest.mark.parametrize("xs", [{"a": 1}, "abc", 7])
def test_for_each_over_a_non_list_fails_with_expression_error(xs):
    h = Harness(machine_from(loop_doc(max_iterations=10, for_each="input.xs")))
    h.start("lp", {"xs": xs})
    assert h.terminal().event.error.type == "ExpressionError"
    assert h.state.steps["l"].status == "failed"


def test_for_each_with_until_may_stop_early():
    h = Harness(machine_from(loop_doc(max_iterations=10, for_each="input.xs", until="steps.body.output == 'found'")))
    h.start("lp", {"xs": [1, 2, 3, 4]})
    seen = drive(h, lambda i, r: "found" if i == 1 else "no")
    assert len(seen) == 2 and h.state.steps["l"].ended_by == "until"


def test_for_each_with_more_batches_than_max_iterations_stops_at_max_iterations():
    h = Harness(machine_from(loop_doc(max_iterations=2, for_each="input.xs")))
    h.start("lp", {"xs": [1, 2, 3, 4]})
    seen = drive(h, lambda i, r: i)
    assert len(seen) == 2 and h.state.steps["l"].ended_by == "max_iterations"


def test_for_each_without_max_iterations_runs_every_batch_beyond_the_default_bound():
    wf = compile_yaml(loop_doc(for_each="input.xs"))
    h = Harness(Machine({"lp": wf}))
    h.start("lp", {"xs": list(range(150))})
    seen = drive(h, lambda i, r: i)
    assert len(seen) == 150 and h.state.steps["l"].ended_by == "items"


def test_for_each_without_max_iterations_is_capped_at_the_engine_cap():
    wf = compile_yaml(loop_doc(for_each="input.xs", steps=[{"id": "skip", "end": {"when": "false"}}]))
    h = Harness(Machine({"lp": wf}))
    h.start("lp", {"xs": list(range(ENGINE_MAX_ITERATIONS + 5))})
    # the body needs no activity: one decision runs the loop to the cap; items were left, so the loop is
    # exhausted (on_exhausted defaults to fail) rather than silently succeeding with part of the list done
    assert h.status == "failed" and h.terminal().event.error.type == "LoopExhausted"
    assert h.state.steps["l"].ended_by == "max_iterations" and h.state.steps["l"].iteration == ENGINE_MAX_ITERATIONS - 1


# --- every way a loop ends, and its ended_by ------------------------------------------------------------


def _ends_by_until(h):
    h.start("lp")
    drive(h, lambda i, r: {"done": i == 1})


def _ends_by_max(h):
    h.start("lp")
    drive(h, lambda i, r: {"done": False})


def _ends_by_timeout(h):
    h.start("lp")
    h.fire("l:loop_timeout")


def _ends_by_failure(h):
    h.start("lp")
    h.fail("body", "Boom", retryable=False)


def _ends_by_no_progress(h):
    h.start("lp")
    drive(h, lambda i, r: {"done": False})


ENDINGS = [
    ("until", dict(until="steps.body.output.done", timeout="1h"), _ends_by_until, "succeeded"),
    ("max_iterations", dict(until="steps.body.output.done", on_exhausted="continue", timeout="1h"), _ends_by_max, "succeeded"),
    ("timeout", dict(until="steps.body.output.done", timeout="5s", on_exhausted="continue"), _ends_by_timeout, "succeeded"),
    ("failed", dict(until="steps.body.output.done", timeout="1h"), _ends_by_failure, "failed"),
    ("no_progress", dict(until="steps.body.output.done", no_progress=1, on_exhausted="continue", timeout="1h"), _ends_by_no_progress, "succeeded"),
]


@pytest.mark.parametrize("ended_by,options,how,status", ENDINGS, ids=[e[0] for e in ENDINGS])
def test_ended_by_records_how_the_loop_ended_and_its_timer_is_gone(ended_by, options, how, status):
    h = Harness(machine_from(loop_doc(max_iterations=3, **options)))
    how(h)
    step = h.state.steps["l"]
    assert step.ended_by == ended_by and step.status == status
    assert "l:loop_timeout" not in h.state.timers
    assert len(terminal_events_in(h.commands)) == 1


def test_a_loop_timeout_cancels_the_in_flight_iteration_and_a_late_completion_is_ignored():
    h = Harness(machine_from(loop_doc(max_iterations=3, until="false", timeout="5s", on_exhausted="fail")))
    [req] = requests_in(h.start("lp"))
    out = h.fire("l:loop_timeout")
    assert cancels_in(out) == [req.request_id]
    assert h.state.steps["l#0/body"].status == "cancelled"
    assert h.terminal().event.error.type == "LoopExhausted" and "timeout" in h.terminal().event.error.message
    assert ignored_in(h.deliver(succeeded(req, 1)))


# --- end and fail inside a loop -------------------------------------------------------------------------


def test_an_end_step_inside_a_loop_finishes_the_run():
    body = [{"id": "body", "activity": "body", "input": {"i": "${ iteration }"}},
            {"id": "stop", "end": {"when": "steps.body.output >= 2", "output": "{'stopped_at': iteration}"}}]
    h = Harness(machine_from(loop_doc(after=True, max_iterations=10, steps=body)))
    h.start("lp")
    drive(h, lambda i, r: i)
    assert h.terminal().event.output == {"stopped_at": 2}
    assert not any(r.step_id == "after" for r in requests_in(h.commands))


def test_a_fail_step_inside_a_loop_fails_the_loop_by_failed():
    body = [{"id": "body", "activity": "body", "input": {"i": "${ iteration }"}},
            {"id": "stop", "fail": {"when": "steps.body.output == 'bad'", "reason": "'bad at ' + string(iteration)"}}]
    h = Harness(machine_from(loop_doc(max_iterations=10, steps=body)))
    h.start("lp")
    drive(h, lambda i, r: "bad" if i == 1 else "ok")
    assert h.state.steps["l"].ended_by == "failed"
    end = h.terminal().event
    assert end.error.type == "WorkflowFailed" and end.error.message == "bad at 1"


# --- every loop terminates --------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    dict(max_iterations=7, until="false", on_exhausted="continue"),
    dict(max_iterations=7, no_progress=3, on_exhausted="continue"),
    dict(max_iterations=7, for_each="[1,2,3,4,5,6,7,8,9,10]", batch_size=3),
])
def test_a_loop_whose_body_never_waits_still_ends(options):
    h = Harness(machine_from(loop_doc(steps=[{"id": "noop", "end": {"when": "false"}}], **options)))
    h.start("lp")
    assert h.status == "succeeded"
    assert h.state.steps["l"].ended_by in ("max_iterations", "no_progress", "items")
