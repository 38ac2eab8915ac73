"""Given/when/then tables for map steps: one sub-flow per item of a CEL list, max_concurrency, item order,
joins and failure policies, dropped item frames, and a 10,000-item run."""
from __future__ import annotations

import inspect
import json
import time
from typing import Any

import pytest

from tests.machine_helpers import Harness, accepted, compile_yaml, dump, ignored_in, machine_from, requests_in, succeeded, terminal_events_in
from legato.topics.models import ActivityCompleted
from legato.workflows.machine import CancelRequest, Machine
from legato.workflows.model import DefinitionError


def mapping(items: str = "input.xs", steps: list[dict[str, Any]] | None = None, after: bool = True, **spec: Any) -> str:
    body = steps or [{"id": "work", "activity": "work", "input": {"item": "${ item }", "index": "${ index }"}}]
    doc: dict[str, Any] = {"name": "mapping", "steps": [{"id": "m", "map": {"items": items, "steps": body, **spec}}]}
    if after:
        doc["steps"].append({"id": "after", "activity": "after", "input": {"got": "${ steps.m.output }"}})
    return json.dumps(doc)


def cancels_in(commands) -> list[str]:
    return [c.cancel.request_id for c in commands if isinstance(c, CancelRequest)]


def by_index(h: Harness) -> dict[int, Any]:
    """The pending `work` requests by item index."""
    return {r.input["index"]: r for r in h.pending() if r.step_id == "work"}


def test_one_sub_flow_per_item_with_item_and_index_in_scope():
    h = Harness(machine_from(mapping()))
    out = h.start("mapping", {"xs": ["a", "b", "c"]})
    reqs = requests_in(out)
    assert [r.input for r in reqs] == [{"item": "a", "index": 0}, {"item": "b", "index": 1}, {"item": "c", "index": 2}]
    assert [r.request_id for r in reqs] == ["r1/m[0]/work/1", "r1/m[1]/work/1", "r1/m[2]/work/1"]


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_the_output_is_a_list_in_item_order_whatever_the_completion_order(order):
    h = Harness(machine_from(mapping()))
    h.start("mapping", {"xs": ["a", "b", "c"]})
    pending = by_index(h)
    for i in order:
        h.succeed(pending[i], {"done": pending[i].input["item"]})
    expected = [{"done": "a"}, {"done": "b"}, {"done": "c"}]
    assert h.state.steps["m"].output == expected
    assert h.pending_for("after").input == {"got": expected}


def test_a_multi_step_item_sub_flow_reads_its_own_earlier_step():
    steps = [
        {"id": "fetch", "activity": "fetch", "input": {"url": "${ item.url }"}},
        {"id": "summarize", "activity": "summarize", "input": {"text": "${ steps.fetch.output }", "i": "${ index }"}},
    ]
    h = Harness(machine_from(mapping(steps=steps, after=False)))
    h.start("mapping", {"xs": [{"url": "u0"}, {"url": "u1"}]})
    fetches = {r.input["url"]: r for r in h.pending()}
    h.succeed(fetches["u1"], "text1")
    assert [(r.step_id, r.input) for r in h.pending() if r.step_id == "summarize"] == [("summarize", {"text": "text1", "i": 1})]
    h.succeed(fetches["u0"], "text0")
    for r in [r for r in h.pending() if r.step_id == "summarize"]:
        h.succeed(r, f"sum{r.input['i']}")
    assert h.terminal().event.output == ["sum0", "sum1"]


@pytest.mark.parametrize("n,limit", [(10, 1), (10, 3), (7, 7), (5, 100)])
def test_max_concurrency_bounds_the_items_in_flight(n, limit):
    h = Harness(machine_from(mapping(max_concurrency=limit, after=False)))
    h.start("mapping", {"xs": list(range(n))})
    started = []
    peak = 0
    while h.status == "running":
        pending = h.pending()
        assert 0 < len(pending) <= limit
        peak = max(peak, len(pending))
        req = pending[-1]  # finish the newest first: completion order differs from start order
        started.append(req.input["index"])
        h.succeed(req, req.input["item"] * 10)
    assert peak == min(n, limit)
    assert sorted(started) == list(range(n))
    assert h.terminal().event.output == [i * 10 for i in range(n)]


def test_an_empty_list_gives_an_empty_list_at_once():
    h = Harness(machine_from(mapping(max_concurrency=2)))
    out = h.start("mapping", {"xs": []})
    assert h.state.steps["m"].status == "succeeded" and h.state.steps["m"].output == []
    assert [r.step_id for r in requests_in(out)] == ["after"]
    assert requests_in(out)[0].input == {"got": []}
    assert "m:join_timeout" not in h.state.timers


@pytest.mark.parametrize("xs", [{"a": 1}, "abc", 3, None])
def test_items_that_are_not_a_list_fail_the_step_with_expression_error(xs):
    h = Harness(machine_from(mapping()))
    out = h.start("mapping", {"xs": xs})
    end = h.terminal().event
    assert end.status == "failed" and end.error.type == "ExpressionError"
    assert "m" in end.error.message and "not a list" in end.error.message
    assert h.state.steps["m"].status == "failed" and not requests_in(out)


def test_items_that_fail_to_evaluate_fail_the_step_with_expression_error():
    h = Harness(machine_from(mapping(items="input.missing.xs")))
    h.start("mapping", {})
    assert h.terminal().event.error.type == "ExpressionError"


# --- failure policies and joins ---------------------------------------------------------------------


# given 4 items, a policy and a join, when items finish like this, then the step ends like this
# ("ok"/"fail" by index; output or error type; indices cancelled)
MAP_TABLE = [
    ("fail_fast", "all", [(1, "fail")], "failed", "Boom", [0, 2, 3]),
    ("continue", "all", [(1, "fail"), (0, "ok"), (3, "ok"), (2, "fail")], "succeeded", [0, None, None, 30], []),
    ({"default": -1}, "all", [(2, "fail"), (0, "ok"), (1, "ok"), (3, "ok")], "succeeded", [0, 10, -1, 30], []),
    ("fail_fast", "any", [(2, "ok")], "succeeded", [None, None, 20, None], [0, 1, 3]),
    ("continue", "first_success", [(0, "fail"), (3, "ok")], "succeeded", [None, None, None, 30], [1, 2]),
    ("continue", "first_success", [(0, "fail"), (1, "fail"), (2, "fail"), (3, "fail")], "failed", "Boom", []),
    ("continue", {"n_of": 2}, [(0, "fail"), (1, "ok"), (3, "ok")], "succeeded", [None, 10, None, 30], [2]),
    ("continue", {"n_of": 3}, [(0, "fail"), (1, "fail")], "failed", "Boom", [2, 3]),
]


@pytest.mark.parametrize("policy,join,script,status,result,cancelled", MAP_TABLE)
def test_map_failure_policies_and_joins(policy, join, script, status, result, cancelled):
    h = Harness(machine_from(mapping(on_failure=policy, join=join)))
    h.start("mapping", {"xs": [0, 1, 2, 3]})
    pending = by_index(h)
    mark = len(h.commands)
    for i, outcome in script:
        if outcome == "ok":
            h.succeed(pending[i], i * 10)
        else:
            h.fail(pending[i], "Boom", retryable=False)
    m = h.state.steps["m"]
    assert m.status == status
    assert sorted(cancels_in(h.commands[mark:])) == [f"r1/m[{i}]/work/1" for i in cancelled]
    if status == "succeeded":
        assert m.output == result
        assert h.pending_for("after").input == {"got": result}
    else:
        assert h.terminal().event.error.type == result
        assert h.state.requests == {}


def test_a_late_completion_of_a_cancelled_item_is_ignored_and_changes_nothing():
    h = Harness(machine_from(mapping(join="any")))
    h.start("mapping", {"xs": [0, 1, 2]})
    pending = by_index(h)
    h.succeed(pending[1], "one")
    snapshot = dump(h.state)
    for i in (0, 2):
        out = h.deliver(succeeded(pending[i], "late"))
        assert [c.reason for c in ignored_in(out)] in (["duplicate_completion"], ["stale_attempt"])
        assert dump(h.state) == snapshot


def test_a_completion_of_a_finished_and_dropped_item_is_ignored_as_stale():
    h = Harness(machine_from(mapping(after=False)))
    h.start("mapping", {"xs": [0, 1]})
    pending = by_index(h)
    h.succeed(pending[0], "zero")
    assert "m[0]/work" not in h.state.steps  # dropped with its frame
    snapshot = dump(h.state)
    [ignored] = ignored_in(h.deliver(succeeded(pending[0], "again")))
    assert ignored.reason == "stale_attempt"
    assert dump(h.state) == snapshot


def test_join_timeout_proceed_gives_nulls_for_items_that_did_not_arrive_or_never_started():
    h = Harness(machine_from(mapping(timeout="30s", on_timeout="proceed", max_concurrency=2)))
    h.start("mapping", {"xs": [0, 1, 2, 3]})
    h.succeed(by_index(h)[1], 10, now=h.now + 1_000)
    assert sorted(by_index(h)) == [0, 2]
    out = h.fire("m:join_timeout")
    assert sorted(cancels_in(out)) == ["r1/m[0]/work/1", "r1/m[2]/work/1"]
    assert h.state.steps["m"].output == [None, 10, None, None]
    assert h.state.steps["m[0]/work"].status == "timed_out"
    assert h.pending_for("after").input == {"got": [None, 10, None, None]}


def test_join_timeout_fail_fails_with_join_timeout():
    h = Harness(machine_from(mapping(timeout="30s", on_timeout="fail")))
    h.start("mapping", {"xs": [0, 1]})
    h.fire("m:join_timeout")
    assert h.terminal().event.error.type == "JoinTimeout"
    assert h.state.requests == {} and set(h.state.timers) == {"run:retention"}


def test_a_fail_step_inside_an_item_is_an_item_failure():
    steps = [{"id": "work", "activity": "work", "input": {"item": "${ item }", "index": "${ index }"}},
             {"id": "check", "fail": {"when": "steps.work.output < 0", "reason": "'negative at ' + string(index)"}}]
    h = Harness(machine_from(mapping(steps=steps, on_failure={"default": "bad"}, after=False)))
    h.start("mapping", {"xs": [0, 1, 2]})
    pending = by_index(h)
    h.succeed(pending[0], 1)
    h.succeed(pending[1], -1)
    h.succeed(pending[2], 2)
    assert h.terminal().event.output == [1, "bad", 2]
    # fail_fast: the reason reaches the run
    h = Harness(machine_from(mapping(steps=steps, after=False)))
    h.start("mapping", {"xs": [0, 1]})
    h.succeed(by_index(h)[1], -1)
    assert h.terminal().event.error.message == "negative at 1"


def test_an_end_step_inside_an_item_ends_the_run_and_cancels_the_other_items():
    steps = [{"id": "work", "activity": "work", "input": {"item": "${ item }", "index": "${ index }"}},
             {"id": "stop", "end": {"when": "steps.work.output == 'found'", "output": "{'found_at': index}"}}]
    h = Harness(machine_from(mapping(steps=steps)))
    h.start("mapping", {"xs": [0, 1, 2]})
    out = h.succeed(by_index(h)[1], "found")
    assert h.terminal().event.output == {"found_at": 1}
    assert sorted(cancels_in(out)) == ["r1/m[0]/work/1", "r1/m[2]/work/1"]


def test_a_nested_map_sees_its_own_item_and_index():
    inner = {"id": "inner", "map": {"items": "item", "steps": [{"id": "leaf", "activity": "leaf", "input": {"v": "${ item }", "i": "${ index }"}}]}}
    h = Harness(machine_from(mapping(steps=[inner], after=False)))
    h.start("mapping", {"xs": [["a", "b"], ["c"]]})
    got = sorted((r.request_id, r.input["v"], r.input["i"]) for r in h.pending())
    assert got == [("r1/m[0]/inner[0]/leaf/1", "a", 0), ("r1/m[0]/inner[1]/leaf/1", "b", 1), ("r1/m[1]/inner[0]/leaf/1", "c", 0)]
    for r in h.pending():
        h.succeed(r, r.input["v"].upper())
    assert h.terminal().event.output == [["A", "B"], ["C"]]


def test_unknown_step_in_items_is_refused():
    with pytest.raises(DefinitionError) as caught:
        compile_yaml(mapping(items="steps.ghost.output"), "f.yaml")
    assert caught.value.path == "steps[0].map.items" and "unknown step 'ghost'" in caught.value.reason


def test_duplicate_ids_inside_the_item_steps_are_refused():
    with pytest.raises(DefinitionError) as caught:
        compile_yaml(mapping(steps=[{"id": "m", "activity": "x"}]))
    assert caught.value.path == "steps[0].map.steps[0].id"


def test_on_failure_retry_reruns_a_failed_item_with_its_item_and_index():
    """Regression: at commit 399678d a map accepted ``on_failure: retry`` but treated it as fail_fast (the retry
    branch in ``_fanout_child_finished`` had ``and not is_map``): one failed item failed the whole map. Fixed in
    the working tree."""
    h = Harness(machine_from(mapping(on_failure="retry", after=False)))
    h.start("mapping", {"xs": [1, 2]})
    out = h.fail(by_index(h)[0], "Boom", retryable=False)
    assert h.state.steps["m"].status == "running"
    assert [r.input for r in requests_in(out)] == [{"item": 1, "index": 0}]
    h.succeed(by_index(h)[0], "one")
    h.succeed(by_index(h)[1], "two")
    assert h.terminal().event.output == ["one", "two"]


def test_on_failure_retry_gives_an_item_three_runs_in_all_then_fails_the_map():
    h = Harness(machine_from(mapping(on_failure="retry", after=False)))
    h.start("mapping", {"xs": ["a", "b"]})
    ids = []
    for _ in range(3):
        req = by_index(h)[0]
        ids.append(req.request_id)
        assert req.input == {"item": "a", "index": 0}
        h.fail(req, "Boom", retryable=False)
    assert len(set(ids)) == 3
    assert h.terminal().event.error.type == "Boom"
    assert h.state.requests == {}


# --- state stays small; 10,000 items ------------------------------------------------------------------


def test_finished_item_frames_are_dropped_from_the_state():
    h = Harness(machine_from(mapping(max_concurrency=3, after=False)))
    h.start("mapping", {"xs": list(range(50))})
    sizes = []
    while h.status == "running":
        req = h.pending()[0]
        h.succeed(req, req.input["index"])
        if h.status == "running":
            sizes.append((len(h.state.frames), len(h.state.steps)))
            assert set(h.state.steps["m"].children) == {f for f in h.state.frames if f != "root"}
    assert max(f for f, _ in sizes) <= 1 + 3 and max(s for _, s in sizes) <= 1 + 3
    assert h.state.steps["m"].output == list(range(50))


def test_a_map_of_10000_items_with_max_concurrency_100_completes(capsys):
    """Feeds 10,000 completions, the way the coordinator does (``in_place=True`` where the machine offers it:
    the coordinator decides on a state it has just decoded). Prints decide()'s total time; asserts no time."""
    machine = Machine({"mapping": compile_yaml(mapping(max_concurrency=100, after=False))})
    kw = {"in_place": True} if "in_place" in inspect.signature(machine.decide).parameters else {}
    n = 10_000
    now = 1_700_000_000_000
    t = time.perf_counter()
    state, out = machine.decide(None, accepted("mapping", {"xs": list(range(n))}), now)
    spent = time.perf_counter() - t
    queue = requests_in(out)
    assert len(queue) == 100
    decisions = 1
    peak_pending = len(state.requests)
    peak_frames = peak_steps = 0
    while queue:
        req = queue.pop(0)
        now += 1
        event = ActivityCompleted(request_id=req.request_id, run_id=req.run_id, step_id=req.step_id, attempt=1, status="succeeded", output=req.input["item"] * 2)
        t = time.perf_counter()
        state, out = machine.decide(state, event, now, **kw)
        spent += time.perf_counter() - t
        decisions += 1
        queue.extend(requests_in(out))
        peak_pending = max(peak_pending, len(state.requests))
        peak_frames = max(peak_frames, len(state.frames))
        peak_steps = max(peak_steps, len(state.steps))
    assert state.status == "succeeded"
    assert state.output == [i * 2 for i in range(n)]
    assert peak_pending <= 100 and peak_frames <= 101 and peak_steps <= 101
    with capsys.disabled():
        mode = "in place" if kw else "copying the state"
        print(f"\n10,000-item map, max_concurrency 100, decide {mode}: {decisions} decisions, "
              f"decide() total {spent:.2f} s ({spent / decisions * 1e3:.3f} ms each)")
