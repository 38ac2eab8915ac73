"""legato.streams.metrics: metrics derived from real decisions of legato.workflows.machine.Machine, read back from the registry."""
from __future__ import annotations

import socket
import textwrap
import urllib.request
from typing import Any

import pytest
import yaml

from legato.streams.metrics import UNKNOWN_WORKFLOW, Metrics, count_in_flight, reason_label
from legato.workflows.transitions import parallel_concurrency
from legato.topics.models import ActivityCompleted, ActivityRequested, Cost, ErrorInfo, RunAccepted, TimerFired
from legato.workflows.machine import Machine, RequestActivity
from legato.workflows.model import compile_workflow
from legato.workflows.state import RunState, StepState

T0 = 1_700_000_000_000

TRIAGE = """
name: triage
steps:
  - id: classify
    activity: classify_ticket
    input: {text: "${ input.text }"}
  - id: enrich
    parallel:
      branches:
        customer: [{id: customer, activity: lookup_customer}]
        history: [{id: history, activity: lookup_history}]
  - id: route
    choice:
      cases:
        - when: "steps.classify.output.category == 'billing'"
          steps: [{id: billing, activity: answer_billing}]
      default:
        - id: draft
          loop:
            max_iterations: 4
            until: "steps.write_reply.output.score >= 0.9"
            steps: [{id: write_reply, activity: write_reply, input: {round: "${ iteration }"}}]
"""

ROUTED = """
name: routed
steps:
  - id: pick
    choice:
      route: "input.kind"
      routes:
        fast: [{id: fast, activity: fast_work}]
      default: [{id: slow, activity: slow_work}]
"""

COUNTED = """
name: counted
steps:
  - id: polish
    loop:
      max_iterations: 3
      until: "steps.improve.output.done"
      on_exhausted: continue
      steps: [{id: improve, activity: improve}]
"""

FRAGILE = """
name: fragile
steps:
  - id: checks
    parallel:
      branches:
        a: [{id: a, activity: check_a}]
        b: [{id: b, activity: check_b, retry: {max_attempts: 2, backoff: 1s}}]
"""


def machine(*texts: str) -> Machine:
    compiled = [compile_workflow(yaml.safe_load(textwrap.dedent(t)), "<test>") for t in texts]
    return Machine({wf.name: wf for wf in compiled})


class Run:
    """One run driven through the Machine; every decision goes to ``Metrics.decision`` like the shell does."""

    def __init__(self, m: Machine, metrics: Metrics, run_id: str = "r1"):
        self.m, self.metrics, self.run_id = m, metrics, run_id
        self.state: RunState | None = None
        self.now = T0

    def deliver(self, event: Any, at: int, overhead: float | None = None) -> list[Any]:
        self.now = at
        old = self.state
        self.state, commands, events = self.m.decide_events(old, event, at)
        if overhead is None and isinstance(event, ActivityCompleted):
            overhead = 0.002
        self.metrics.decision(events, commands, overhead)
        return commands

    def start(self, workflow: str, input: dict | None = None, at: int = T0) -> list[Any]:
        return self.deliver(RunAccepted(run_id=self.run_id, workflow=workflow, input=input or {}), at)

    def pending(self, step_id: str) -> ActivityRequested:
        assert self.state is not None
        found = [ActivityRequested.model_validate(self.state.steps[k].request) for k in self.state.requests.values()]
        found = [r for r in found if r.step_id == step_id]
        assert len(found) == 1, found
        return found[0]

    def succeed(self, step_id: str, output: Any, at: int, cost: dict | None = None) -> list[Any]:
        r = self.pending(step_id)
        return self.deliver(ActivityCompleted(request_id=r.request_id, run_id=r.run_id, step_id=r.step_id, attempt=r.attempt, status="succeeded",
                                              output=output, cost=Cost(**cost) if cost else None), at)

    def fail(self, step_id: str, at: int, error_type: str = "Boom", retryable: bool = False) -> list[Any]:
        r = self.pending(step_id)
        return self.deliver(ActivityCompleted(request_id=r.request_id, run_id=r.run_id, step_id=r.step_id, attempt=r.attempt, status="failed",
                                              error=ErrorInfo(type=error_type, message="no", retryable=retryable)), at)

    def fire(self, timer_id: str) -> list[Any]:
        assert self.state is not None
        return self.deliver(TimerFired(run_id=self.run_id, timer_id=timer_id), self.state.timers[timer_id].due_ms)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def drive_triage(metrics: Metrics, text: str = "my screen shows an error", run_id: str = "r1") -> Run:
    run = Run(machine(TRIAGE), metrics, run_id)
    run.start("triage", {"text": text})
    category = "billing" if "invoice" in text else "technical"
    run.succeed("classify", {"category": category}, T0 + 100, cost={"usd": 0.001, "tokens_in": 200, "tokens_out": 5, "model": "small-llm"})
    run.succeed("history", {"tickets": 1}, T0 + 150)
    run.succeed("customer", {"tier": "gold"}, T0 + 300)
    if category == "billing":
        run.succeed("billing", {"reply": "ok"}, T0 + 400, cost={"usd": 0.003, "tokens_in": 600, "tokens_out": 150, "model": "large-llm"})
        return run
    for i, score in enumerate((0.6, 0.75, 0.9)):
        run.succeed("write_reply", {"score": score}, T0 + 400 + 100 * i, cost={"usd": 0.004, "tokens_in": 800, "tokens_out": 300, "model": "large-llm"})
    return run


def test_a_finished_run_counts_start_completion_duration_and_cost(metrics):
    run = drive_triage(metrics)
    assert run.state.status == "succeeded"
    assert value(metrics, "legato_runs_started_total", workflow="triage") == 1
    assert value(metrics, "legato_runs_completed_total", workflow="triage") == 1
    assert value(metrics, "legato_run_duration_seconds_count", workflow="triage", outcome="succeeded") == 1
    assert value(metrics, "legato_run_duration_seconds_sum", workflow="triage", outcome="succeeded") == pytest.approx(0.6)
    assert value(metrics, "legato_run_cost_usd_sum", workflow="triage") == pytest.approx(0.013)
    assert value(metrics, "legato_run_tokens_sum", workflow="triage", direction="in") == 200 + 3 * 800
    assert value(metrics, "legato_run_tokens_sum", workflow="triage", direction="out") == 5 + 3 * 300
    assert value(metrics, "legato_cost_usd_total", workflow="triage", model="large-llm") == pytest.approx(0.012)
    assert value(metrics, "legato_cost_usd_total", workflow="triage", model="small-llm") == pytest.approx(0.001)
    assert value(metrics, "legato_runs_failed_total", workflow="triage", error_type="RunFailed") is None


def test_choice_paths_loops_and_parallel_concurrency(metrics):
    drive_triage(metrics)
    drive_triage(metrics, "where is my invoice", run_id="r2")
    assert value(metrics, "legato_choice_paths_total", workflow="triage", step="route", path="default") == 1
    assert value(metrics, "legato_choice_paths_total", workflow="triage", step="route", path="case0") == 1
    assert value(metrics, "legato_loop_iterations_count", workflow="triage", step="draft") == 1
    assert value(metrics, "legato_loop_iterations_sum", workflow="triage", step="draft") == 3
    assert value(metrics, "legato_loop_endings_total", workflow="triage", step="draft", ended_by="until") == 1
    assert value(metrics, "legato_loop_endings_total", workflow="triage", step="draft", ended_by="max_iterations") == 0
    assert value(metrics, "legato_parallel_potential_concurrency_sum", workflow="triage", step="enrich") == 4
    assert value(metrics, "legato_parallel_achieved_concurrency_sum", workflow="triage", step="enrich") == 4
    assert value(metrics, "legato_parallel_achieved_concurrency_count", workflow="triage", step="enrich") == 2
    # per-step latency by step id (never by loop-iteration key)
    assert value(metrics, "legato_step_duration_seconds_count", workflow="triage", kind="activity", step="write_reply") == 3
    assert value(metrics, "legato_step_duration_seconds_sum", workflow="triage", kind="parallel", step="enrich") == pytest.approx(0.4)  # two runs, 200 ms each
    assert value(metrics, "legato_steps_finished_total", workflow="triage", kind="choice", step="route", status="succeeded") == 2


def test_overhead_is_observed_for_completions_that_request_the_next_activity(metrics):
    drive_triage(metrics)
    # classify → both branches; customer → route's loop; write_reply ×2 → next iteration. history → nothing.
    assert value(metrics, "legato_step_overhead_seconds_count", workflow="triage") == 4
    assert value(metrics, "legato_step_overhead_seconds_sum", workflow="triage") == pytest.approx(0.008)


def test_a_trigger_or_timer_does_not_observe_overhead(metrics):
    run = Run(machine(TRIAGE), metrics)
    commands = run.start("triage", {"text": "x"})
    assert any(isinstance(c, RequestActivity) for c in commands)
    assert value(metrics, "legato_step_overhead_seconds_count", workflow="triage") is None


def test_undeclared_route_counts_as_default_and_declared_route_by_name(metrics):
    m = machine(ROUTED)
    a = Run(m, metrics, "a")
    a.start("routed", {"kind": "fast"})
    b = Run(m, metrics, "b")
    b.start("routed", {"kind": "never-declared"})
    assert value(metrics, "legato_choice_paths_total", workflow="routed", step="pick", path="route:fast") == 1
    assert value(metrics, "legato_choice_paths_total", workflow="routed", step="pick", path="default") == 1


def test_a_loop_that_reaches_max_iterations(metrics):
    run = Run(machine(COUNTED), metrics)
    run.start("counted")
    for i in range(3):
        run.succeed("improve", {"done": False}, T0 + 10 * (i + 1))
    assert run.state.status == "succeeded"
    assert run.state.steps["polish"].ended_by == "max_iterations"
    assert value(metrics, "legato_loop_endings_total", workflow="counted", step="polish", ended_by="max_iterations") == 1
    assert value(metrics, "legato_loop_endings_total", workflow="counted", step="polish", ended_by="until") == 0
    assert value(metrics, "legato_loop_iterations_sum", workflow="counted", step="polish") == 3


def test_failures_by_pattern_section_and_failed_run(metrics):
    run = Run(machine(FRAGILE), metrics)
    run.start("fragile")
    run.fail("b", T0 + 50, "Flaky", retryable=True)  # a retry: the step has not failed yet
    assert value(metrics, "legato_step_failures_total", workflow="fragile", kind="activity", step="b", error_type="Flaky") is None
    run.fire("checks/b/b:retry:1")
    run.fail("a", T0 + 2000, "Refused")
    assert run.state.status == "failed"
    assert value(metrics, "legato_step_failures_total", workflow="fragile", kind="activity", step="a", error_type="Refused") == 1
    assert value(metrics, "legato_step_failures_total", workflow="fragile", kind="parallel", step="checks", error_type="Refused") == 1
    assert value(metrics, "legato_steps_finished_total", workflow="fragile", kind="activity", step="b", status="cancelled") == 1
    assert value(metrics, "legato_runs_failed_total", workflow="fragile", error_type="Refused") == 1
    assert value(metrics, "legato_run_duration_seconds_count", workflow="fragile", outcome="failed") == 1
    # the failed parallel step still reports its concurrency: both branches were in flight at once
    assert value(metrics, "legato_parallel_achieved_concurrency_sum", workflow="fragile", step="checks") == 2


def test_timed_out_activity_counts_as_failure(metrics):
    text = """
    name: slow
    steps: [{id: s, activity: slow, timeout: 1s}]
    """
    run = Run(machine(text), metrics)
    run.start("slow")
    run.fire("s:timeout:1")
    assert value(metrics, "legato_step_failures_total", workflow="slow", kind="activity", step="s", error_type="ActivityTimeout") == 1
    assert value(metrics, "legato_steps_finished_total", workflow="slow", kind="activity", step="s", status="timed_out") == 1
    assert value(metrics, "legato_runs_failed_total", workflow="slow", error_type="ActivityTimeout") == 1


def test_unknown_workflow_keeps_the_label_bounded(metrics):
    run = Run(machine(TRIAGE), metrics)
    run.start("no-such-workflow-3f9a")
    assert run.state.status == "failed"
    assert value(metrics, "legato_runs_failed_total", workflow=UNKNOWN_WORKFLOW, error_type="UnknownWorkflow") == 1
    assert value(metrics, "legato_runs_started_total", workflow="no-such-workflow-3f9a") is None
    names = {s.labels.get("workflow") for f in metrics.registry.collect() for s in f.samples}
    assert "no-such-workflow-3f9a" not in names


def test_ignored_and_repeated_decisions_count_nothing_twice(metrics):
    run = drive_triage(metrics)
    before = value(metrics, "legato_runs_completed_total", workflow="triage")
    state = run.state
    # a duplicate completion after the run finished: the machine returns the same state
    new, commands, events = run.m.decide_events(state, TimerFired(run_id="r1", timer_id="nothing"), T0 + 5000)
    assert events == []
    metrics.decision(events, commands, 0.001)
    assert value(metrics, "legato_runs_completed_total", workflow="triage") == before
    assert value(metrics, "legato_choice_paths_total", workflow="triage", step="route", path="default") == 1
    assert value(metrics, "legato_loop_endings_total", workflow="triage", step="draft", ended_by="until") == 1
    assert value(metrics, "legato_runs_started_total", workflow="triage") == 1


def test_parallel_concurrency_from_timestamps():
    def step(key: str, start: int, end: int | None, kind: str = "activity") -> StepState:
        return StepState(key=key, step_id=key.rsplit("/", 1)[-1], kind=kind, frame=key.rsplit("/", 1)[0], started_ms=start, finished_ms=end, attempt=1)

    p = StepState(key="p", step_id="p", kind="parallel", frame="root", started_ms=0, finished_ms=400, children=["p/a", "p/b", "p/c"])
    steps = [p, step("p/a/a1", 0, 100), step("p/a/a2", 100, 400), step("p/b/b1", 0, 50),
             step("p/c/c1", 300, 350), step("p/c/gate", 0, 300, kind="choice")]
    state = RunState(run_id="x", workflow="w", version=1, started_ms=0, steps={s.key: s for s in steps})
    # a and b overlap at 0; c's activity only starts at 300, when b is long done: at most 2 at once
    assert parallel_concurrency(state, p, 400) == (3, 2)


def test_dead_letter_reasons_are_bounded(metrics):
    metrics.dead_letter("legato.triggers", "bad trigger: 1 validation error for RunRequested workflow Field required")
    metrics.dead_letter("legato.triggers", "bad trigger: not JSON")
    metrics.dead_letter("legato.requests.x", "request for activity 'y' on the topic of 'x'")
    metrics.dead_letter("legato.completions", "internal error: KeyError: 'a'")
    assert value(metrics, "legato_dead_letters_total", topic="legato.triggers", reason="bad_trigger") == 2
    assert value(metrics, "legato_dead_letters_total", topic="legato.requests.x", reason="wrong_activity_topic") == 1
    assert value(metrics, "legato_dead_letters_total", topic="legato.completions", reason="internal_error") == 1
    assert reason_label("") == "unknown"


def test_engine_and_activity_hooks(metrics):
    metrics.ignored("duplicate_completion")
    metrics.ignored("duplicate_completion")
    metrics.event_processed("completion")
    metrics.activity_started("classify_ticket")
    metrics.activity_started("classify_ticket")
    metrics.activity_finished("classify_ticket")
    metrics.activity_wait("classify_ticket", 0.02)
    metrics.activity_wait("classify_ticket", -0.001)  # clock skew between hosts never goes negative
    metrics.activity_done("classify_ticket", "succeeded", 0.1, "")
    metrics.activity_done("classify_ticket", "failed", 0.2, "DemoFailure")
    metrics.runs_in_flight(7)
    metrics.lag("g", "legato.completions", 3, 12)
    assert value(metrics, "legato_events_ignored_total", reason="duplicate_completion") == 2
    assert value(metrics, "legato_coordinator_events_total", kind="completion") == 1
    assert value(metrics, "legato_activities_in_flight", activity="classify_ticket") == 1
    assert value(metrics, "legato_activity_wait_seconds_count", activity="classify_ticket") == 2
    assert value(metrics, "legato_activity_wait_seconds_sum", activity="classify_ticket") == pytest.approx(0.02)
    assert value(metrics, "legato_activity_execution_seconds_count", activity="classify_ticket", status="failed") == 1
    assert value(metrics, "legato_activity_errors_total", activity="classify_ticket", error_type="DemoFailure") == 1
    assert value(metrics, "legato_runs_in_flight") == 7
    assert value(metrics, "legato_consumer_lag", group="g", topic="legato.completions", partition="3") == 12


def test_run_counts_are_read_at_each_scrape_and_a_failed_read_keeps_the_last(metrics):
    table = {"running": 3, "retained": 4, "fail": False}

    def counts() -> tuple[int, int]:
        if table["fail"]:
            raise RuntimeError("dictionary changed size during iteration")
        return table["running"], table["retained"]

    metrics.count_runs(counts)
    assert (value(metrics, "legato_runs_in_flight"), value(metrics, "legato_runs_retained")) == (3, 4)
    table.update(running=0, retained=7)  # the last run ended: the next scrape says so, no timer in between
    assert (value(metrics, "legato_runs_in_flight"), value(metrics, "legato_runs_retained")) == (0, 7)
    table.update(running=9, fail=True)
    assert (value(metrics, "legato_runs_in_flight"), value(metrics, "legato_runs_retained")) == (0, 7)


def test_count_in_flight_reads_raw_table_values():
    running = RunState(run_id="a", workflow="w", version=1, started_ms=1).model_dump_json(exclude_defaults=True).encode()
    done = RunState(run_id="b", workflow="w", version=1, started_ms=1, status="succeeded").model_dump_json(exclude_defaults=True).encode()
    assert count_in_flight([running, done, None, running, b"not json"]) == 2


def test_serve_exposes_the_registry_and_zero_disables(metrics):
    assert metrics.serve(0) is False
    assert metrics.serve(None) is False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    drive_triage(metrics)
    assert metrics.serve(port, addr="127.0.0.1") is True
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'legato_runs_completed_total{workflow="triage"} 1.0' in body
    assert "# TYPE legato_run_duration_seconds histogram" in body
    assert "run_id" not in body
    other = Metrics()  # a second instance has its own registry: nothing leaks between them
    assert other.registry.get_sample_value("legato_runs_completed_total", {"workflow": "triage"}) is None


def test_every_metric_is_documented():
    """The generated reference (docs/reference/metrics.md) has a row for every metric a registry exports, with a
    help text a reader can use (not the metric's name again); tests/test_docs.py keeps the page in step with the code."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "reference" / "metrics.md").read_text(encoding="utf-8")
    families = list(Metrics().registry.collect())
    assert len(families) > 30
    for family in families:
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{family.name}")), None)
        assert row is not None, f"{family.name} missing from docs/reference/metrics.md"
        assert len(family.documentation.split()) >= 4, f"{family.name}: help text too short to explain it: {family.documentation!r}"
        assert family.documentation.replace("|", "\\|") in row


WAITING = """
name: approve
steps:
  - id: approvals
    parallel:
      join: {n_of: 1}
      branches:
        a: [{id: a, wait: {signal: legal}}]
        b: [{id: b, wait: {signal: finance}}]
"""


def test_waits_count_runs_waiting_their_duration_and_ignored_signals(metrics):
    from legato.topics.models import SignalSent

    run = Run(machine(WAITING), metrics)
    run.start("approve")
    assert value(metrics, "legato_runs_waiting", workflow="approve", signal="legal") == 1
    assert value(metrics, "legato_runs_waiting", workflow="approve", signal="finance") == 1
    run.deliver(SignalSent(run_id="r1", signal="legal", data=True, signal_id="s1"), T0 + 30_000)
    assert value(metrics, "legato_runs_waiting", workflow="approve", signal="legal") == 0
    assert value(metrics, "legato_runs_waiting", workflow="approve", signal="finance") == 0  # the other branch lost
    assert value(metrics, "legato_wait_duration_seconds_sum", workflow="approve", signal="legal", status="succeeded") == 30
    assert value(metrics, "legato_wait_duration_seconds_count", workflow="approve", signal="finance", status="cancelled") == 1
    run.deliver(SignalSent(run_id="r1", signal="legal", signal_id="s1"), T0 + 31_000)
    _, commands, events = run.m.decide_events(None, SignalSent(run_id="nobody", signal="legal"), T0 + 31_000)
    metrics.decision(events, commands)
    assert value(metrics, "legato_signals_ignored_total", reason="run_finished") == 1
    assert value(metrics, "legato_signals_ignored_total", reason="unknown_run") == 1


def test_every_declared_choice_path_exists_at_zero_so_dead_paths_show(metrics):
    m = machine(TRIAGE)
    metrics.declare(d.workflow for d in m.definitions())
    for path in ("case0", "default"):
        assert value(metrics, "legato_choice_paths_total", workflow="triage", step="route", path=path) == 0
    drive_triage(metrics)
    assert value(metrics, "legato_choice_paths_total", workflow="triage", step="route", path="case0") == 0
    assert value(metrics, "legato_choice_paths_total", workflow="triage", step="route", path="default") == 1


def test_every_metric_the_docs_name_exists():
    """The metric names README and the pages under docs/ mention are real: each is one the coordinator's or a
    worker's registry exports."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = "".join(p.read_text(encoding="utf-8") for p in [root / "README.md", *sorted((root / "docs").rglob("*.md"))])
    named = set(re.findall(r"`(legato_[a-z_]+)`", text))
    exported = {f.name for f in Metrics().registry.collect()}
    exported |= {name + suffix for name in exported for suffix in ("_total",)}  # counters collect without _total
    assert len(named) > 20
    assert named <= exported, f"the docs name metrics nobody exports: {sorted(named - exported)}"


def test_every_reason_an_event_is_ignored_for_is_in_the_metric_tables():
    """The ``reason`` label values of ``legato_events_ignored_total`` that the machine and the coordinator write (a
    refused redrive or fork included) are all listed in its help text, hence in its row of the generated reference."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = "".join(p.read_text(encoding="utf-8") for d in ("workflows", "streams/coordinator") for p in sorted((root / d).rglob("*.py")))
    reasons = set(re.findall(r'EventIgnored\([^)]*reason="([a-z_]+)"', code))
    reasons |= set(re.findall(r'\b(?:ignore|_count_ignored)\("([a-z_]+)"', code))
    assert {"redrive_refused", "fork_refused", "duplicate_trigger", "stale_attempt", "replayed"} <= reasons
    row = next(line for line in (root / "docs/reference/metrics.md").read_text(encoding="utf-8").splitlines() if line.startswith("| `legato_events_ignored_total`"))
    listed = set(re.findall(r"[a-z_]+", row))
    missing = sorted(r for r in reasons if r not in listed)
    assert not missing, f"legato_events_ignored_total's help does not list {missing}"


def test_activity_attempts_that_run_out_of_a_deadline_are_counted_by_deadline(metrics):
    from legato.topics.models import ActivityStarted

    run = Run(machine("""
name: slow
steps:
  - id: a
    activity: work
    run_timeout: 1s
    start_timeout: 5s
    timeout: 1m
    retry: {max_attempts: 3, backoff: 1s, jitter: false}
"""), metrics)
    run.start("slow")
    run.fire("a:start_timeout:1")
    run.fire("a:retry:1")
    r = run.pending("a")
    run.deliver(ActivityStarted(request_id=r.request_id, run_id="r1", step_id="a", attempt=2, started_ms=run.now + 10), run.now + 10)
    run.fire("a:run_timeout:2")
    run.fire("a:retry:2")
    run.fire("a:start_timeout:3")
    assert value(metrics, "legato_activity_timeouts_total", workflow="slow", step="a", deadline="start_timeout") == 2
    assert value(metrics, "legato_activity_timeouts_total", workflow="slow", step="a", deadline="run_timeout") == 1
    assert value(metrics, "legato_activity_timeouts_total", workflow="slow", step="a", deadline="timeout") is None
    assert value(metrics, "legato_step_failures_total", workflow="slow", kind="activity", step="a", error_type="ActivityStartTimeout") == 1


def test_rate_limited_attempts_are_counted(metrics):
    run = Run(machine("""
name: limited
steps:
  - {id: a, activity: model_call, retry: {max_attempts: 2, backoff: 1s}}
"""), metrics)
    run.start("limited")
    run.fail("a", T0 + 10, error_type="RateLimited", retryable=True)
    run.fire("a:retry:1")
    run.fail("a", run.now + 10, error_type="Boom", retryable=True)
    assert value(metrics, "legato_activity_rate_limited_total", workflow="limited", step="a") == 1
