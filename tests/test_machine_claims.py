"""Given/when/then: expressions see the values of payload references, the run keeps the references (claim checks,
legato.workflows.claims). The lookup stands for the shell's cache of fetched payloads."""
from __future__ import annotations

import hashlib
import json

import orjson
import pytest

from legato.topics.payload_refs import canonical_digest
from legato.workflows.catalog import Catalog
from legato.workflows.claims import Fetched, PayloadsMissing, Unreadable, rereference
from legato.workflows.machine import Machine
from tests.machine_helpers import Harness, catalog_from, requests_in

FLOW = json.dumps({
    "name": "big",
    "steps": [
        {"id": "fetch", "activity": "fetch"},
        {"id": "route", "choice": {"cases": [
            {"when": "size(steps.fetch.output.text) > 1000", "steps": [
                {"id": "summarize", "activity": "summarize", "input": {"doc": "${ steps.fetch.output }", "n": "${ size(steps.fetch.output.text) }"}}]},
        ], "default": [{"id": "short", "activity": "short"}]}},
        {"id": "spread", "map": {"items": "steps.fetch.output.parts", "steps": [
            {"id": "part", "activity": "part", "input": {"part": "${ item }"}}]}},
        {"id": "join", "activity": "join", "input": {"parts": "${ steps.spread.output }", "first": "${ steps.spread.output[0] }"}},
    ],
    "output": "{'chars': size(steps.fetch.output.text), 'doc': steps.fetch.output}",
})


def _ref(value, run_id="r1"):
    data = orjson.dumps(value)
    sha = hashlib.sha256(data).hexdigest()
    return {"$ref": f"legato-payload:{run_id}/{sha}", "size": len(data), "sha256": sha, "chunks": 1, "partition": 0, "offset": 7}


class Store:
    """The shell's side: payloads by id; ``fetched`` says which the lookup may answer."""

    def __init__(self):
        self.values: dict[str, object] = {}
        self.fetched: set[str] = set()
        self.unreadable: dict[str, str] = {}

    def add(self, value, fetched=True):
        ref = _ref(value)
        pid = ref["$ref"].split(":", 1)[1]
        self.values[pid] = value
        if fetched:
            self.fetched.add(pid)
        return ref

    def lookup(self, pid):
        if pid in self.unreadable:
            return Unreadable(self.unreadable[pid])
        if pid not in self.fetched:
            return None
        value = self.values[pid]
        return Fetched(value, canonical_digest(value), len(orjson.dumps(value)))


def _machine(store):
    return Machine(catalog_from(FLOW), payloads=store.lookup)


def test_conditions_maps_and_outputs_see_values_while_requests_and_the_run_keep_references():
    store = Store()
    doc = {"text": "x" * 5000, "parts": ["p0", "p1"]}
    ref = store.add(doc)
    h = Harness(_machine(store))
    h.start("big")
    out = h.succeed("fetch", ref)
    [summarize] = requests_in(out)
    assert summarize.step_id == "summarize"  # the condition read the value: size 5000 > 1000
    assert summarize.input == {"doc": ref, "n": 5000}  # the whole value goes on as its reference
    assert h.state.view["fetch"]["output"] == ref
    out = h.succeed("summarize", "ok")
    parts = requests_in(out)
    assert sorted(r.input["part"] for r in parts) == ["p0", "p1"]  # the map's items came from the value
    part_refs = [store.add({"big": f"{r.input['part']}" * 400}) for r in parts]
    for r, pref in zip(parts, part_refs):
        out = h.succeed(r, pref)
    [join] = requests_in(out)
    assert join.input == {"parts": part_refs, "first": part_refs[0]}  # the join's list of references, not values
    out = h.succeed("join", {"done": True})
    event = h.terminal().event
    assert event.type == "run.completed", event
    assert event.output == {"chars": 5000, "doc": ref}
    assert b"x" * 5000 not in orjson.dumps(h.state.model_dump(mode="json"))  # the run document holds no value


def test_a_value_not_fetched_stops_the_decision_for_the_shell_to_fetch_it():
    store = Store()
    ref = store.add({"text": "y" * 3000, "parts": []}, fetched=False)
    h = Harness(_machine(store))
    h.start("big")
    with pytest.raises(PayloadsMissing) as caught:
        h.succeed("fetch", ref)
    assert caught.value.refs == [ref]


def test_an_unreadable_payload_fails_the_expression_that_reads_it():
    store = Store()
    ref = store.add({"text": "z" * 3000, "parts": []})
    store.unreadable[ref["$ref"].split(":", 1)[1]] = "0 of 1 chunks found (deleted by its run's retention?)"
    h = Harness(_machine(store))
    h.start("big")
    h.succeed("fetch", ref)
    step = h.state.steps["route"]
    assert step.status == "failed" and step.error.type == "ExpressionError" and "deleted by its run's retention" in step.error.message


def test_without_a_lookup_expressions_see_the_references():
    h = Harness(Machine(catalog_from(FLOW)))
    h.start("big")
    ref = _ref({"text": "x" * 5000, "parts": []})
    h.succeed("fetch", ref)
    assert h.state.steps["route"].error.type == "ExpressionError"  # no key 'text' in a reference


def test_rereference_puts_back_every_part_equal_to_a_value_read_and_leaves_the_rest():
    value = {"b": [1, 2, 3] * 100, "a": "q" * 300}
    ref = _ref(value)
    seen = {canonical_digest(value): ref}
    reordered = {"a": "q" * 300, "b": [1, 2, 3] * 100}  # CEL maps may come back in another key order
    assert rereference({"x": reordered, "y": 1, "z": "small"}, seen) == {"x": ref, "y": 1, "z": "small"}
    assert rereference([reordered["b"]], seen) == [reordered["b"]]
    assert rereference(reordered, {}) is reordered


@pytest.mark.parametrize("source", [
    "size(steps[input.which].output.text)",  # an index only known when the expression runs
    "size(steps.map(s, s).filter(s, s == input.which).map(s, steps[s].output.text)[0])",  # steps as a whole
])
def test_an_expression_that_picks_a_step_at_run_time_sees_its_value(source):
    """Reading ``steps`` other than by a literal id (``steps.a``, ``steps["a"]``, ``"a" in steps``) resolves every
    step's references: which steps it reads is not known before it runs."""
    from legato.workflows.claims import Claims
    from legato.workflows.expressions import compile_expression

    store = Store()
    ref = store.add({"text": "x" * 5000})
    expr = compile_expression(source)
    steps = {"a": {"output": ref}, "b": {"output": {"text": "short"}}}
    assert expr.evaluate({"steps": steps, "input": {"which": "a"}}, Claims(store.lookup)) == 5000
    assert expr.evaluate({"steps": steps, "input": {"which": "b"}}, Claims(store.lookup)) == 5
    assert compile_expression('size(steps["a"].output.text)').steps_read == {"a"}  # literal ids stay narrow
    assert compile_expression("'a' in steps && steps.b.output != null").steps_read == {"a", "b"}
    assert compile_expression("steps.exists(s, s == 'a')").steps_read is None


def test_an_ignored_completion_keeps_its_payloads_for_the_runs_retention():
    """A duplicate or a stale attempt whose output the worker stored under the run's id: nothing refers to it, so the
    state lists it (``unused_payloads``) for the run's retention to delete; listed once, and never another run's."""
    from legato.workflows.machine import EventIgnored, KeepUnusedPayloads
    from tests.machine_helpers import succeeded

    store = Store()
    h = Harness(_machine(store))
    h.start("big")
    fetch = h.pending_for("fetch")
    h.succeed(fetch, store.add({"text": "x" * 5000, "parts": []}))
    late = _ref({"text": "another answer " * 400, "parts": []})  # the duplicate's own output, another value
    out = h.deliver(succeeded(fetch, late))
    assert [type(c) for c in out] == [EventIgnored, KeepUnusedPayloads], out
    pid = late["$ref"].split(":", 1)[1]
    assert out[1].payload_ids == [pid]
    assert h.state.unused_payloads == [{"id": pid, "size": late["size"], "sha256": late["sha256"], "partition": 0, "chunks": 1}]
    assert "legato-payload:" + pid not in h.state.encoded().decode()  # not a reference: the shell does not fetch it
    # the same payload again: nothing new to keep, the state is not changed
    assert [type(c) for c in h.deliver(succeeded(fetch, late))] == [EventIgnored]
    # another run's payload is not this run's to delete
    foreign = _ref({"text": "z" * 5000}, run_id="r2")
    assert [type(c) for c in h.deliver(succeeded(fetch, foreign))] == [EventIgnored]
    assert len(h.state.unused_payloads) == 1


def test_a_completion_for_a_run_no_longer_known_has_its_payloads_deleted_at_once():
    """A completion for a run the coordinator does not know (forgotten by its retention, or never there) whose output
    the worker stored under that run's id: no state will ever list it, and no attempt of a run with that id can be
    accepted any more, so the machine asks for its deletion now; never another run's payload."""
    from legato.topics.models import ActivityCompleted
    from legato.workflows.machine import EventIgnored, ForgetPayloads

    mine, foreign = _ref({"text": "late " * 1000}, run_id="gone"), _ref({"text": "z" * 5000}, run_id="r2")
    late = ActivityCompleted(request_id="gone/fetch/1", run_id="gone", step_id="fetch", attempt=1, status="succeeded",
                             output={"a": mine, "b": foreign})
    state, out = _machine(Store()).decide(None, late, 1_000)
    assert state is None
    assert [type(c) for c in out] == [EventIgnored, ForgetPayloads], out
    pid = mine["$ref"].split(":", 1)[1]
    assert out[1].run_id == "gone"
    assert out[1].payloads == [{"id": pid, "size": mine["size"], "sha256": mine["sha256"], "partition": 0, "chunks": 1}]
    # nothing stored by reference under its id: nothing more than the ignored event
    plain = late.model_copy(update={"output": {"text": "small"}})
    assert [type(c) for c in _machine(Store()).decide(None, plain, 1_000)[1]] == [EventIgnored]


def test_an_attempts_progress_payloads_are_kept_for_the_runs_retention():
    """Progress chunks stored by reference never reach the coordinator; the completion lists them
    (``progress_payloads``), accepted or ignored, and the run keeps them in ``unused_payloads`` for its retention;
    for a run no longer known they are deleted at once. Never another run's."""
    from legato.topics.models import StoredPayload
    from legato.workflows.machine import EventIgnored, ForgetPayloads, KeepUnusedPayloads
    from tests.machine_helpers import succeeded

    def stored(run_id: str, text: str) -> StoredPayload:
        ref = _ref({"text": text}, run_id=run_id)
        return StoredPayload(id=ref["$ref"].split(":", 1)[1], size=ref["size"], sha256=ref["sha256"], partition=0, chunks=1)

    mine, again, foreign = stored("r1", "p" * 5000), stored("r1", "q" * 5000), stored("r2", "z" * 5000)
    store = Store()
    h = Harness(_machine(store))
    h.start("big")
    fetch = h.pending_for("fetch")
    before = h.state.model_copy(deep=True)
    out = h.deliver(succeeded(fetch, {"text": "small", "parts": []}).model_copy(update={"progress_payloads": [mine, foreign, mine]}))
    assert isinstance(out[-1], KeepUnusedPayloads) and out[-1].payload_ids == [mine.id], out
    assert h.state.unused_payloads == [mine.model_dump(exclude_none=True)]
    assert before.unused_payloads == []  # the caller's state was not changed (decided on a copy)
    # a duplicate attempt, ignored, with progress of its own: listed too, the first not twice
    out = h.deliver(succeeded(fetch, {"text": "small", "parts": []}).model_copy(update={"progress_payloads": [mine, again]}))
    assert [type(c) for c in out] == [EventIgnored, KeepUnusedPayloads] and out[1].payload_ids == [again.id], out
    assert [p["id"] for p in h.state.unused_payloads] == [mine.id, again.id]

    late = succeeded(fetch, None).model_copy(update={"run_id": "gone", "progress_payloads": [stored("gone", "g" * 5000), foreign]})
    state, out = _machine(Store()).decide(None, late, 1_000)
    assert state is None and [type(c) for c in out] == [EventIgnored, ForgetPayloads], out
    assert [p["id"] for p in out[1].payloads] == [stored("gone", "g" * 5000).id]
