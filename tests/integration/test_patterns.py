"""End to end on a real broker: one test per step kind, through a coordinator and a worker in separate processes."""
from __future__ import annotations

import uuid

import pytest

from legato.topics.models import ActivityCompleted, ActivityRequested

pytestmark = pytest.mark.integration


def new_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4()}"


async def test_sequential_activities_pass_outputs_on(legato):
    event = await legato.run("e2e_sequential", {"start": 5})
    assert event.type == "run.completed", event
    assert event.status == "succeeded"
    assert event.output == {"first": 6, "second": 16, "third": 116}
    assert event.workflow == "e2e_sequential"
    assert event.path == []
    assert event.finished_at and event.duration_ms is not None and event.duration_ms >= 0
    events = await legato.assert_single_terminal(event.run_id)
    assert [e.type for e in events] == ["run.started", "run.completed"]
    requests = await legato.records_of(legato.topics.requests("e2e_add"), ActivityRequested, event.run_id)
    assert [(r.step_id, r.input) for r in requests] == [
        ("first", {"value": 5, "add": 1}),
        ("second", {"value": 6, "add": 10}),
        ("third", {"value": 16, "add": 100}),
    ]


async def test_parallel_join_waits_for_every_branch(legato):
    event = await legato.run("e2e_parallel", {"start": 40})
    assert event.status == "succeeded", event
    # The output of a parallel step is a map by branch name; the chained branch gives its last step's output.
    assert event.output == {
        "fast": {"tag": "fast", "slept": 0.05},
        "slow": {"tag": "slow", "slept": 1.0},
        "chained": {"value": 42},
    }
    assert event.duration_ms >= 1000, "the join fired before the slow branch finished"
    assert event.cost is not None and event.cost["usd"] == pytest.approx(0.002)
    await legato.assert_single_terminal(event.run_id)
    # `after` was requested once, after the join, with the joined map.
    after = [r for r in await legato.records_of(legato.topics.requests("e2e_echo"), ActivityRequested, event.run_id) if r.step_id == "after"]
    assert len(after) == 1
    assert after[0].input == {"joined": event.output}


async def test_choice_cases_and_default(legato):
    cases = {50: ({"size": "big"}, ["pick:case0"]), 5: ({"size": "small"}, ["pick:case1"]), -1: ({"size": "none"}, ["pick:default"])}
    run_ids = {n: await legato.trigger("e2e_choice_cases", {"n": n}) for n in cases}
    events = await legato.wait_for(set(run_ids.values()))
    for n, (output, path) in cases.items():
        event = events[run_ids[n]]
        assert event.status == "succeeded", event
        assert event.output == output, (n, event)
        assert event.path == path, (n, event)
        await legato.assert_single_terminal(event.run_id)


async def test_choice_route_and_undeclared_route_goes_to_default(legato):
    cases = {
        "alpha": ({"went": "alpha"}, ["dispatch:route:alpha"]),
        "beta": ({"went": "beta"}, ["dispatch:route:beta"]),
        "gamma": ({"went": "default"}, ["dispatch:default(gamma)"]),  # not a declared route: its name is on the path
        7: ({"went": "default"}, ["dispatch:default"]),  # not even a string
    }
    run_ids = {kind: await legato.trigger("e2e_choice_routes", {"kind": kind}) for kind in cases}
    events = await legato.wait_for(set(run_ids.values()))
    for kind, (output, path) in cases.items():
        event = events[run_ids[kind]]
        assert event.status == "succeeded", event
        assert event.output == output, (kind, event)
        assert event.path == path, (kind, event)
        await legato.assert_single_terminal(event.run_id)


async def test_loop_until_met(legato):
    event = await legato.run("e2e_loop", {"target": 3})
    assert event.status == "succeeded", event
    assert event.output == {"n": 3}
    await legato.assert_single_terminal(event.run_id)
    ticks = await legato.records_of(legato.topics.requests("e2e_echo"), ActivityRequested, event.run_id)
    assert [r.input for r in ticks] == [{"n": 1}, {"n": 2}, {"n": 3}]


async def test_loop_max_iterations_exhausted_fails(legato):
    event = await legato.run("e2e_loop", {"target": 99})
    assert event.type == "run.failed", event
    assert event.status == "failed"
    assert event.error is not None and event.error.type == "LoopExhausted", event.error
    assert event.output is None
    await legato.assert_single_terminal(event.run_id)
    ticks = await legato.records_of(legato.topics.requests("e2e_echo"), ActivityRequested, event.run_id)
    assert len(ticks) == 4, "max_iterations is 4"


async def test_retry_after_a_failed_attempt(legato):
    run_id = new_id("retry")
    event = await legato.run("e2e_retry", {"run_id": run_id}, run_id=run_id)
    assert event.status == "succeeded", event
    assert event.output == {"attempts": 2, "step_attempt": 2}
    await legato.assert_single_terminal(run_id)
    requests = await legato.records_of(legato.topics.requests("e2e_flaky"), ActivityRequested, run_id)
    assert [r.attempt for r in requests] == [1, 2]
    assert requests[0].request_id != requests[1].request_id
    completions = await legato.records_of(legato.topics.completions, ActivityCompleted, run_id)
    assert [(c.attempt, c.status) for c in completions] == [(1, "failed"), (2, "succeeded")]
    assert completions[0].error is not None and completions[0].error.type == "E2ETransient"


async def test_activity_timeout_without_retry_fails_the_run(legato):
    event = await legato.run("e2e_activity_timeout")
    assert event.type == "run.failed", event
    assert event.error is not None and event.error.type == "ActivityTimeout", event.error
    assert event.duration_ms < 3000, "the run waited for the handler instead of the 300 ms step timeout"
    await legato.assert_single_terminal(event.run_id)
    requests = await legato.records_of(legato.topics.requests("e2e_sleep"), ActivityRequested, event.run_id)
    assert len(requests) == 1, "no retry policy: one attempt"


async def test_non_retryable_activity_error_fails_the_run(legato):
    event = await legato.run("e2e_fatal")
    assert event.type == "run.failed", event
    assert event.error is not None
    assert event.error.type == "E2EFatal"
    assert event.error.retryable is False
    assert "refuses" in event.error.message
    await legato.assert_single_terminal(event.run_id)
    requests = await legato.records_of(legato.topics.requests("e2e_fatal"), ActivityRequested, event.run_id)
    assert len(requests) == 1, "retryable=False skips the retry policy (max_attempts 3)"


async def test_run_timeout(legato):
    event = await legato.run("e2e_run_timeout")
    assert event.type == "run.failed", event
    assert event.error is not None and event.error.type == "RunTimeout", event.error
    assert 700 <= event.duration_ms < 5000, event.duration_ms
    await legato.assert_single_terminal(event.run_id)


async def test_end_step_stops_the_run_with_its_output(legato):
    stopped = await legato.trigger("e2e_end", {"v": 10})
    passed = await legato.trigger("e2e_end", {"v": 1})
    events = await legato.wait_for({stopped, passed})
    assert events[stopped].status == "succeeded", events[stopped]
    assert events[stopped].output == {"stopped": True, "v": 10}
    assert events[passed].status == "succeeded", events[passed]
    assert events[passed].output == {"later": True}
    for run_id in (stopped, passed):
        await legato.assert_single_terminal(run_id)
    later = [r for r in await legato.records_of(legato.topics.requests("e2e_echo"), ActivityRequested, stopped) if r.step_id == "later"]
    assert later == [], "a step after a taken `end` ran"


async def test_fail_step(legato):
    refused = await legato.trigger("e2e_fail", {"amount": 500})
    accepted = await legato.trigger("e2e_fail", {"amount": 50})
    events = await legato.wait_for({refused, accepted})
    assert events[refused].type == "run.failed", events[refused]
    assert events[refused].error is not None
    assert events[refused].error.type == "WorkflowFailed"
    assert events[refused].error.message == "amount too large: 500"
    assert events[accepted].status == "succeeded", events[accepted]
    assert events[accepted].output == {"accepted": 50}
    for run_id in (refused, accepted):
        await legato.assert_single_terminal(run_id)


async def test_example_support_triage_billing_path(legato):
    event = await legato.run("support_triage", {"text": "I was charged twice on my invoice", "email": "ann@example.com"})
    assert event.status == "succeeded", event
    assert event.output == {"category": "billing", "path": "billing"}
    assert event.path == ["route:case0"]
    assert event.cost is not None and event.cost["usd"] > 0
    await legato.assert_single_terminal(event.run_id)


async def test_example_support_triage_draft_loop_path(legato):
    event = await legato.run("support_triage", {"text": "How do I change my password?", "email": "bob@example.org"})
    assert event.status == "succeeded", event
    assert event.output == {"category": "general", "path": "draft"}
    assert event.path == ["route:default"]
    await legato.assert_single_terminal(event.run_id)
    drafts = await legato.records_of(legato.topics.requests("write_reply"), ActivityRequested, event.run_id)
    # write_reply scores 0.6, 0.75, 0.9: `until` (score >= 0.9) is met on the third draft.
    assert [r.input["round"] for r in drafts] == [0, 1, 2]


async def test_example_due_diligence(legato):
    cases = {  # name: (input, decision, path)
        "approved": ({"name": "Alice", "credit_score": 700, "references": ["r1", "r2"]}, "approved", ["decide:case1"]),
        "rejected": ({"name": "Mallory", "credit_score": 800, "references": ["r1", "r2"]}, "rejected", ["decide:case0"]),
        "low_credit": ({"name": "Carol", "credit_score": 500, "references": ["r1", "r2"]}, "rejected", ["decide:case0"]),
        # credit between the thresholds: the run waits for a reviewer's `review` signal, then applies it
        "review": ({"name": "Bob", "credit_score": 600, "references": ["r1"]}, "approved", ["decide:default"]),
    }
    run_ids = {case: await legato.trigger("due_diligence", data) for case, (data, _, _) in cases.items()}
    review_id = run_ids["review"]
    events = await legato.wait_for({r for case, r in run_ids.items() if case != "review"})
    # the others have finished; the review run is still waiting for its reviewer
    assert [e.type for e in await legato.run_events(review_id, until=bool)] == ["run.started"]
    await legato.client.signal(review_id, "review", {"decision": "approve", "by": "ada"}, signal_id=f"review-{review_id}")
    events.update(await legato.wait_for({review_id}))
    for case, (data, decision, path) in cases.items():
        event = events[run_ids[case]]
        assert event.status == "succeeded", event
        assert event.output["decision"] == decision, event
        checks = event.output["checks"]
        assert set(checks) == {"identity", "credit", "references", "background"}
        assert checks["identity"] == {"verified": True}
        assert checks["credit"] == {"score": data["credit_score"]}
        assert checks["references"] == {"positive": len(data["references"]), "total": len(data["references"])}
        assert checks["background"] == {"flagged": data["name"] == "Mallory"}
        assert event.path == path, event
        assert event.cost is not None and event.cost["usd"] == pytest.approx(0.019)
        await legato.assert_single_terminal(event.run_id)
    review = await legato.records_of(legato.topics.requests("apply_review"), ActivityRequested, review_id)
    assert [r.input for r in review] == [{"name": "Bob", "review": {"decision": "approve", "by": "ada"}}]
