"""Given/when/then tables for a run's side of cluster-wide limits: a limited step acquires before its request goes
out, a grant sends it, whatever ends the attempt releases it once (with the tokens used and a 429's pause), a grant
nobody waits for is released, run concurrency keys hold the root frame, and the definitions refused."""
from __future__ import annotations

import pytest

from legato.topics.limits import LimitGranted
from legato.topics.models import ErrorInfo
from legato.workflows.machine import outstanding
from legato.workflows.model import DefinitionError
from legato.workflows.commands import AcquireLimit, ReleaseLimit
from legato.workflows.run_limits import waiting_for

from tests.machine_helpers import T0, Harness, compile_yaml, failed, ignored_in, machine_from, requests_in

FLOW = """
name: t
limits:
  openai: {requests_per_minute: 500, tokens_per_minute: 200000, concurrency: 20}
steps:
  - id: a
    activity: llm
    limit: openai
    limit_key: "${ input.tenant }"
    approx_tokens: 800
    timeout: 5s
    retry: {max_attempts: 2, backoff: 1s}
"""


def acquires(commands):
    return [c.acquire for c in commands if isinstance(c, AcquireLimit)]


def releases(commands):
    return [c.release for c in commands if isinstance(c, ReleaseLimit)]


def grant(h: Harness, id: str, now: int, limit: str = "openai", key: str = "acme") -> list:
    return h.deliver(LimitGranted(run_id=h.run_id, id=id, limit=limit, key=key, granted_ms=now), now)


def test_a_limited_step_acquires_first_and_sends_its_request_when_granted():
    h = Harness(machine_from(FLOW))
    out = h.start("t", {"tenant": "acme"}, now=T0, priority=5)
    [a] = acquires(out)
    assert (a.id, a.limit, a.key, a.cost, a.priority, a.spec.concurrency) == ("r1/a/1", "openai", "acme", 800, 5, 20)
    assert requests_in(out) == [] and h.pending() == []
    assert waiting_for(h.state.steps["a"].limit_hold) == "openai (acme)"
    assert "a:timeout:1" in h.state.timers  # the wait counts toward the timeout
    out = grant(h, "r1/a/1", T0 + 300)
    assert [r.request_id for r in requests_in(out)] == ["r1/a/1"] and waiting_for(h.state.steps["a"].limit_hold) is None
    out = h.succeed("a", {"ok": True}, now=T0 + 400, cost={"tokens_in": 700, "tokens_out": 300})
    [r] = releases(out)
    assert (r.id, r.key, r.cost, r.pause_ms) == ("r1/a/1", "acme", 1000, None)
    assert h.status == "succeeded"


def test_a_429_releases_with_a_pause_of_the_key_and_the_retry_acquires_again():
    h = Harness(machine_from(FLOW))
    h.start("t", {"tenant": "acme"}, now=T0)
    grant(h, "r1/a/1", T0 + 10)
    req = h.pending_for("a")
    event = failed(req, "RateLimited").model_copy(update={"error": ErrorInfo(type="RateLimited", message="429", retry_after_ms=2000)})
    out = h.deliver(event, T0 + 20)
    [r] = releases(out)
    assert r.pause_ms == 2000
    out = h.fire("a:retry:1")
    assert [a.id for a in acquires(out)] == ["r1/a/2"] and requests_in(out) == []


def test_a_step_that_times_out_while_waiting_leaves_the_queue():
    h = Harness(machine_from(FLOW))
    h.start("t", {"tenant": "acme"}, now=T0)
    out = h.fire("a:timeout:1")
    assert [r.id for r in releases(out)] == ["r1/a/1"]
    assert h.state.steps["a"].limit_hold is None


def test_a_grant_nobody_waits_for_is_released_and_counted():
    h = Harness(machine_from(FLOW))
    h.start("t", {"tenant": "acme"}, now=T0)
    h.fire("a:timeout:1")  # waiting for its retry now
    out = grant(h, "r1/a/1", T0 + 6000)
    assert [r.id for r in releases(out)] == ["r1/a/1"] and [i.reason for i in ignored_in(out)] == ["stale_grant"]
    out = machine_from(FLOW).decide(None, LimitGranted(run_id="gone", id="gone/a/1", limit="openai", key="x", granted_ms=T0), T0)[1]
    assert [r.id for r in releases(out)] == ["gone/a/1"]


def test_a_waiting_acquisition_is_sent_again_after_a_crash_and_the_runs_end_releases():
    h = Harness(machine_from(FLOW))
    h.start("t", {"tenant": "acme"}, now=T0)
    assert [a.id for a in acquires(outstanding(h.state))] == ["r1/a/1"]
    from legato.topics.models import RunCancelRequested
    out = h.deliver(RunCancelRequested(run_id="r1", reason="stop"), T0 + 1)
    assert [r.id for r in releases(out)] == ["r1/a/1"]


RUNS = """
name: keyed
concurrency: {key: "${ input.customer }", limit: 1}
steps: [{id: a, activity: work}]
"""


def test_a_run_waits_for_its_concurrency_key_and_releases_it_when_it_ends():
    h = Harness(machine_from(RUNS))
    out = h.start("keyed", {"customer": "c7"}, now=T0)
    [a] = acquires(out)
    assert (a.id, a.limit, a.key, a.spec.concurrency) == ("run:r1", "run:keyed", "c7", 1)
    assert requests_in(out) == []
    out = grant(h, "run:r1", T0 + 50, limit="run:keyed", key="c7")
    assert [r.step_id for r in requests_in(out)] == ["a"]
    out = h.succeed("a", {}, now=T0 + 60)
    assert [r.id for r in releases(out)] == ["run:r1"] and h.status == "succeeded"


def test_a_keyed_run_waits_from_its_trigger_so_runs_of_a_key_start_in_trigger_order():
    h = Harness(machine_from(RUNS))
    out = h.start("keyed", {"customer": "c7"}, now=T0 + 400, triggered_ms=T0 + 100)  # its partition decided it late
    [a] = acquires(out)
    assert a.requested_ms == T0 + 100 and h.state.limit_hold["since_ms"] == T0 + 100
    later = Harness(machine_from(RUNS))
    [b] = acquires(later.start("keyed", {"customer": "c7"}, now=T0 + 300, triggered_ms=T0 + 900))  # a clock ahead
    assert b.requested_ms == T0 + 300


def test_an_unknown_limit_fails_the_step():
    h = Harness(machine_from("""
name: u
steps: [{id: a, activity: llm, limit: nowhere}]
"""))
    h.start("u", now=T0)
    assert h.status == "failed" and h.state.error is not None
    assert h.state.steps["a"].error.type == "UnknownLimit"


def test_a_limit_deployed_in_a_limits_document_is_found_and_the_document_cannot_run():
    shared = """
name: shared-limits
limits: {openai: {concurrency: 3}}
"""
    m = machine_from(shared, """
name: u
steps: [{id: a, activity: llm, limit: openai}]
""")
    h = Harness(m)
    out = h.start("u", now=T0)
    assert acquires(out)[0].spec.concurrency == 3
    h2 = Harness(m, run_id="r2")
    h2.start("shared-limits", now=T0)
    assert h2.status == "failed" and h2.state.error.type == "NotRunnable"


@pytest.mark.parametrize("text,path", [
    ("name: w\nlimits: {openai: {}}\nsteps: [{id: a, activity: x}]", "limits.openai"),
    ("name: w\nlimits: {openai: {requests_per_minute: -1}}\nsteps: [{id: a, activity: x}]", "limits.openai.requests_per_minute"),
    ("name: w\nsteps: [{id: a, activity: x, limit_key: '${ input.t }'}]", "steps[0]"),
    ("name: w\nconcurrency: {key: '${ input.c }', limit: 0}\nsteps: [{id: a, activity: x}]", "concurrency.limit"),
    ("name: w\nsteps: [{id: a, activity: x, limit: l, limit_key: '${ steps.nope.output }'}]", "steps[0].limit_key"),
])
def test_bad_limits_are_refused_whole(text, path):
    import yaml
    from legato.workflows.model import compile_workflow
    with pytest.raises(DefinitionError) as caught:
        compile_workflow(yaml.safe_load(text))
    assert caught.value.path == path


def test_a_rate_grant_decided_a_second_or_more_after_the_limiter_gave_it_is_given_back_and_asked_for_again():
    """Grants that waited on the coordinator topic (a takeover) would reach the workers together: they go back."""
    from legato.workflows.run_limits import GRANT_TTL_MS
    h = Harness(machine_from(FLOW))
    h.start("t", {"tenant": "acme"}, now=T0, priority=4)
    out = h.deliver(LimitGranted(run_id=h.run_id, id="r1/a/1", limit="openai", key="acme", granted_ms=T0 + 100), T0 + 100 + GRANT_TTL_MS)
    assert requests_in(out) == []
    [r] = releases(out)
    assert (r.id, r.key, r.cost, r.late) == ("r1/a/1", "acme", 0, True)  # nothing ran: its tokens come back
    [a] = acquires(out)
    assert (a.id, a.key, a.cost, a.priority, a.requested_ms) == ("r1/a/1", "acme", 800, 4, T0)  # keeps its place
    assert [i.reason for i in ignored_in(out)] == ["late_grant"]
    assert waiting_for(h.state.steps["a"].limit_hold) == "openai (acme)"
    # the next grant, fresh, sends the request
    out = h.deliver(LimitGranted(run_id=h.run_id, id="r1/a/1", limit="openai", key="acme", granted_ms=T0 + 2000), T0 + 2000 + GRANT_TTL_MS - 1)
    assert [q.request_id for q in requests_in(out)] == ["r1/a/1"] and releases(out) == []


def test_the_fourth_late_grant_of_an_attempt_is_used_so_a_slow_coordinator_cannot_starve_it():
    from legato.workflows.run_limits import GRANT_TTL_MS, LATE_GRANTS_MAX
    h = Harness(machine_from(FLOW))
    h.start("t", {"tenant": "acme"}, now=T0)
    now = T0
    for n in range(LATE_GRANTS_MAX):
        now += 10 * GRANT_TTL_MS
        out = h.deliver(LimitGranted(run_id=h.run_id, id="r1/a/1", limit="openai", key="acme", granted_ms=now - 5 * GRANT_TTL_MS), now)
        assert requests_in(out) == [] and len(acquires(out)) == 1, n
    out = h.deliver(LimitGranted(run_id=h.run_id, id="r1/a/1", limit="openai", key="acme", granted_ms=now), now + 5 * GRANT_TTL_MS)
    assert [q.request_id for q in requests_in(out)] == ["r1/a/1"]
    assert [i.reason for i in ignored_in(out)] == ["late_grant_used"]


def test_a_late_grant_of_a_concurrency_only_limit_or_a_run_key_is_used():
    """They hold a place, not a moment: a late grant bunches nothing."""
    from legato.workflows.run_limits import GRANT_TTL_MS
    flow = FLOW.replace("{requests_per_minute: 500, tokens_per_minute: 200000, concurrency: 20}", "{concurrency: 2}").replace("    approx_tokens: 800\n", "")
    h = Harness(machine_from(flow))
    h.start("t", {"tenant": "acme"}, now=T0)
    out = h.deliver(LimitGranted(run_id=h.run_id, id="r1/a/1", limit="openai", key="acme", granted_ms=T0), T0 + 60 * GRANT_TTL_MS)
    assert [q.request_id for q in requests_in(out)] == ["r1/a/1"] and acquires(out) == []
