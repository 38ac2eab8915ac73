"""Prometheus metrics of the coordinator and the workers (``prometheus_client``, own registry).

Names follow the Prometheus conventions: ``legato_`` prefix, base units (``_seconds``), counters end in
``_total``. Labels stay bounded — workflow, step (the step id, never a step key with loop iterations), step
kind, activity, path, outcome, error type, model, topic, reason — and never carry a run_id. docs/metrics.md
lists every metric.

The shell calls the hooks; :meth:`Metrics.decision` counts the run-level metrics from the domain events of one
decision (``Machine.decide_events``: step finished, path taken, loop ended, run finished, …) and its commands, so
the state machine itself stays free of metrics.
"""
from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Mapping

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from legato.workflows.machine import PublishRunEvent, RequestActivity
from legato.workflows.model import ActivityStep, ChoiceStep, CompiledWorkflow
from legato.workflows.transitions import AttemptRateLimited, AttemptTimedOut, DomainEvent, LoopEnded, PathTaken, RunFinished, SignalIgnored, StepFinished, StepWaiting

log = logging.getLogger("legato.metrics")

UNKNOWN_WORKFLOW = "_unknown_"
"""The ``workflow`` label of runs triggered for a workflow that is not loaded (keeps the label bounded)."""

FAILED_STEP_STATUSES = ("failed", "timed_out")
FINISHED_STEP_STATUSES = ("succeeded", "failed", "timed_out", "cancelled", "skipped")
LOOP_ENDINGS = ("until", "max_iterations", "items", "timeout", "no_progress", "budget", "failed")

# Buckets in base units.
RUN_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
ACTIVITY_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
WAIT_SECONDS = (1, 10, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400)
OVERHEAD_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
ITERATIONS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 50, 100, 1000)
CONCURRENCY = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)
USD = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TOKENS = (10, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000)
LIMIT_WAIT_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)

LIMIT_KEYS = 100
"""Keys of one limit exported under their own ``key`` label by one process; later keys share ``key="other"``."""
OTHER_KEY = "other"
LIMIT_WINDOW_MS = 60_000
"""The window of ``legato_limit_requests`` and ``legato_limit_tokens``: the last minute, like the budgets."""
LIMIT_BUDGETS = ("requests_per_minute", "tokens_per_minute", "concurrency")

_SNAKE = re.compile(r"[^a-z0-9]+")


def reason_label(reason: str) -> str:
    """A bounded label from a dead-letter reason: ``"bad trigger: <details>"`` → ``"bad_trigger"``."""
    head = reason.split(":", 1)[0].strip().lower()
    if head.startswith("request for activity"):
        return "wrong_activity_topic"
    return _SNAKE.sub("_", head).strip("_")[:40] or "unknown"


def count_in_flight(values: Iterable[bytes | str | None]) -> int:
    """Runs still running among raw run-table values (``RunState`` JSON dumped with ``exclude_defaults``)."""
    n = 0
    for raw in values:
        if raw is None:
            continue
        try:
            status = orjson.loads(raw).get("status", "running")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        n += status == "running"
    return n


class Metrics:
    """Every Legato metric, on a registry of its own (several instances can live in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        disable_created_metrics()  # no `*_created` series: they double the series count for nothing here
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        # runs
        self.runs_started = Counter("legato_runs_started", "Runs started (a run.started event was published).", ["workflow"], registry=r)
        self.runs_completed = Counter("legato_runs_completed", "Runs that finished successfully.", ["workflow"], registry=r)
        self.runs_failed = Counter("legato_runs_failed", "Runs that failed, by the run's error type (UnknownWorkflow, RunTimeout, an activity's error type, ...).", ["workflow", "error_type"], registry=r)
        self.runs_cancelled = Counter("legato_runs_cancelled", "Runs that ended cancelled: a child run its parent no longer waits for, or a run cancelled with a run.cancel_requested record (not counted as failed).", ["workflow"], registry=r)
        self.run_duration = Histogram("legato_run_duration_seconds", "End-to-end run duration, accepted to terminal event; outcome is succeeded, failed or cancelled.", ["workflow", "outcome"], buckets=RUN_SECONDS, registry=r)
        self.in_flight_runs = Gauge("legato_runs_in_flight", "Runs in the coordinator's run table that are still running, as committed when scraped (sum over coordinators).", registry=r)
        self.retained_runs = Gauge("legato_runs_retained", "Finished runs in the coordinator's run table, kept until their workflow's retention (default LEGATO_RETENTION, 7d) ends (sum over coordinators); memory and restore time follow runs in flight plus runs retained.", registry=r)
        self.forgotten_runs = Counter("legato_runs_forgotten", "Finished runs whose retention ended: removed from the run table, a tombstone written to the changelog, their run ids free again for new triggers.", ["workflow"], registry=r)
        # steps and patterns
        self.steps_finished = Counter("legato_steps_finished", "Steps that reached a terminal status (succeeded, failed, timed_out, cancelled, skipped): the denominator of failure rates.", ["workflow", "kind", "step", "status"], registry=r)
        self.step_failures = Counter("legato_step_failures", "Steps that failed or timed out after their retries, by error type; failure rate = this / legato_steps_finished_total.", ["workflow", "kind", "step", "error_type"], registry=r)
        self.step_duration = Histogram("legato_step_duration_seconds", "A step's duration from its start to its terminal status, all attempts and retry back-off included.", ["workflow", "kind", "step"], buckets=RUN_SECONDS, registry=r)
        self.choice_paths = Counter("legato_choice_paths", "Paths taken by choice steps: caseN, route:NAME or default (an undeclared route name goes to, and is counted as, default). Every declared path of every loaded workflow exists at 0 from the coordinator's start, so a path never taken shows.", ["workflow", "step", "path"], registry=r)
        self.loop_iterations = Histogram("legato_loop_iterations", "Iterations a loop ran before it ended.", ["workflow", "step"], buckets=ITERATIONS, registry=r)
        self.loop_endings = Counter("legato_loop_endings", "How loops ended: until, max_iterations, items, timeout, no_progress, budget, failed (all exist, at 0, once a loop has ended).", ["workflow", "step", "ended_by"], registry=r)
        self.parallel_potential = Histogram("legato_parallel_potential_concurrency", "Branches of a finished parallel step: the concurrency it could reach.", ["workflow", "step"], buckets=CONCURRENCY, registry=r)
        self.runs_waiting = Gauge("legato_runs_waiting", "Wait steps waiting for their signal right now, as decided by this coordinator process (a run waiting on two signals counts under each; after a takeover, only the waits that start or end since).", ["workflow", "signal"], registry=r)
        self.wait_duration = Histogram("legato_wait_duration_seconds", "How long a wait step waited: status succeeded (its signal came), timed_out, or cancelled (the run was cancelled or ended, or a sibling branch won).", ["workflow", "signal", "status"], buckets=WAIT_SECONDS, registry=r)
        self.signals_ignored = Counter("legato_signals_ignored", "Signals that completed no wait and were not kept: duplicate_signal (a signal_id the run already received), unknown_run, run_finished, too_many_signals (the run already keeps 64 signals no wait took: dead-lettered).", ["reason"], registry=r)
        self.parallel_achieved = Histogram("legato_parallel_achieved_concurrency", "The most branches of a parallel step that had an activity in flight at the same instant; utilization = rate(achieved_sum) / rate(potential_sum).", ["workflow", "step"], buckets=CONCURRENCY, registry=r)
        self.cache_hits = Counter("legato_cache_hits", "Requests of cache: {ttl} steps the coordinator answered from the result cache (legato.cache) without a worker hop; every declared cache step exists at 0 from the start.", ["workflow", "step"], registry=r)
        self.cache_misses = Counter("legato_cache_misses", "Requests of cache steps sent to a worker because the cache held no fresh entry; hit rate = hits / (hits + misses).", ["workflow", "step"], registry=r)
        # cost
        self.run_cost = Histogram("legato_run_cost_usd", "Cost of one finished run in US dollars (runs without cost count as 0).", ["workflow"], buckets=USD, registry=r)
        self.run_tokens = Histogram("legato_run_tokens", "Tokens of one finished run, by direction (in, out).", ["workflow", "direction"], buckets=TOKENS, registry=r)
        self.cost_usd = Counter("legato_cost_usd", "Cost of finished runs in US dollars, by model (from the run's cost.models; a sub-workflow's cost counts with its top-level run).", ["workflow", "model"], registry=r)
        # engine health
        self.attempt_timeouts = Counter("legato_activity_timeouts", "Activity attempts that ran out of a deadline (each counts, retried or not), by deadline: timeout (request to completion), start_timeout (request to the handler starting), run_timeout (handler start to completion), heartbeat (a started handler's silence).", ["workflow", "step", "deadline"], registry=r)
        self.rate_limited = Counter("legato_activity_rate_limited", "Activity attempts that failed with error type RateLimited (a handler's RateLimited(retry_after=...), an API's 429, or an independent worker's error of that type), retried or not; its retry_after_ms replaces the retry back-off.", ["workflow", "step"], registry=r)
        self.events = Counter("legato_coordinator_events", "Events the coordinator processed: trigger, completion, started (an activity.started record), heartbeat (an activity.heartbeat record), timer, child (a sub-workflow finished), cancel (a run.cancel_requested record), redrive (a run.redrive_requested record), fork (a run.fork_requested or run.fork_accepted record).", ["kind"], registry=r)
        self.events_ignored = Counter("legato_events_ignored", "Events dropped without a state change, by reason: duplicate_trigger, duplicate_completion, stale_attempt, stale_timer, stale_child, unknown_request, duplicate_signal, unknown_run, run_finished, replayed (redelivered after a crash), rekeyed (moved to the run's partition), timer_deferred (a timer read before the completions written ahead of it: decided after them), redrive_refused (a redrive of a run that is not failed, unknown, or would fail the same way again), fork_refused (a fork of an unknown run, or from a step it cannot be forked from), stale_started / stale_heartbeat (an activity.started / activity.heartbeat for a request that is not pending), duplicate_started (a second activity.started for the same attempt), unwatched_started / unwatched_heartbeat (for a step that sets none of start_timeout, run_timeout, heartbeat / no heartbeat: nothing to change), stale_grant (a limit.granted for an attempt or run that no longer waits for it: released at once), late_grant (a rate grant decided 0.5 s or more after the limiter gave it: given back and asked for again), late_grant_used (the fourth late grant of one attempt, used).", ["reason"], registry=r)
        self.dead_letters = Counter("legato_dead_letters", "Messages sent to the dead-letter topic (<prefix>.dlq), by source topic and reason (bad_trigger, bad_completion, bad_coordinator_record, bad_signal, signal_refused, bad_activity_request, wrong_activity_topic, internal_error, ...: the reason text before its first colon).", ["topic", "reason"], registry=r)
        self.overhead = Histogram("legato_step_overhead_seconds", "Orchestration overhead per step: a completion received by the coordinator to the next activity request produced.", ["workflow"], buckets=OVERHEAD_SECONDS, registry=r)
        self.consumer_lag = Gauge("legato_consumer_lag", "Records of a partition not yet committed by this process's consumer group (end offset - committed offset), refreshed every 5 s; processes of one group report the same value (use max by).", ["group", "topic", "partition"], registry=r)
        # cluster-wide limits (the limiter; docs/limits.md); `key` holds at most LIMIT_KEYS values per limit, then "other"
        self.limit_wait = Histogram("legato_limit_wait_seconds", "Time an acquisition waited for its limit: the step ready (or the run triggered, for a concurrency key) to the limiter's grant, by limit and key (a process exports the first 100 keys of a limit under their own label, later ones as key=\"other\"; a workflow's concurrency key is the limit run:<workflow>).", ["limit", "key"], buckets=LIMIT_WAIT_SECONDS, registry=r)
        self.limit_grants = Counter("legato_limit_grants", "Acquisitions the limiter granted (requests let through to workers, runs let start), by limit.", ["limit"], registry=r)
        self.limit_pauses = Counter("legato_limit_pauses", "Pauses of a limit key after a 429 (an attempt failed with RateLimited and a retry_after): every grant of the key waits until it ends, by limit.", ["limit"], registry=r)
        self._limit_use = _LimitUse()
        sampled = self._limit_use.refresh
        self.limit_requests = _sampled(Gauge("legato_limit_requests", "Requests the limiter granted in the last 60 s, by limit and key (compare with legato_limit_value{budget=\"requests_per_minute\"}); reported by the process that owns the key.", ["limit", "key"], registry=r), sampled)
        self.limit_tokens = _sampled(Gauge("legato_limit_tokens", "Tokens charged in the last 60 s, by limit and key: approx_tokens when granted, corrected by the completion's cost on release (compare with legato_limit_value{budget=\"tokens_per_minute\"}).", ["limit", "key"], registry=r), sampled)
        self.limit_in_use = _sampled(Gauge("legato_limit_concurrency_in_use", "Grants held now (granted, not yet released), by limit and key (compare with legato_limit_value{budget=\"concurrency\"}).", ["limit", "key"], registry=r), sampled)
        self.limit_waiting = _sampled(Gauge("legato_limit_waiting", "Acquisitions waiting for a grant now, by limit and key.", ["limit", "key"], registry=r), sampled)
        self.limit_value = _sampled(Gauge("legato_limit_value", "A limit's budget per key, by budget (requests_per_minute, tokens_per_minute, concurrency), as its latest acquisition declared it.", ["limit", "budget"], registry=r), sampled)
        self._limit_use.gauges = (self.limit_requests, self.limit_tokens, self.limit_in_use, self.limit_waiting, self.limit_value)
        # activities (workers)
        self.activity_wait_time = Histogram("legato_activity_wait_seconds", "Queue time: the request produced by the coordinator (requested_ms) to the worker's handler start.", ["activity"], buckets=ACTIVITY_SECONDS, registry=r)
        self.activity_execution = Histogram("legato_activity_execution_seconds", "Handler execution time, by status (succeeded, failed).", ["activity", "status"], buckets=ACTIVITY_SECONDS, registry=r)
        self.payload_bytes_total = Counter("legato_payload_bytes", "Bytes of values stored by reference (claim checks, docs/payloads.md) in the payload store (stored) and read back from it (fetched), by this process.", ["direction"], registry=r)
        self.activity_errors = Counter("legato_activity_errors", "Failed activity executions by error type (ActivityTimeout, InputValidationError, a handler's ActivityError.type, ...).", ["activity", "error_type"], registry=r)
        self.progress_chunks = Counter("legato_progress_chunks", "Progress chunks handlers reported with await progress(chunk), each sent to <prefix>.progress.", ["activity"], registry=r)
        self.activities_abandoned = Counter("legato_activities_abandoned", "Handlers still running when a stopping worker's drain ran out (LEGATO_WORKER_DRAIN_S): cancelled and left unanswered, so their requests run again on the partition's next owner.", ["activity"], registry=r)
        self.activities_in_flight = Gauge("legato_activities_in_flight", "Activity handlers running in this worker process right now.", ["activity"], registry=r)
        # schedules (coordinators; docs/schedules.md)
        self.schedule_ticks_fired = Counter("legato_schedule_ticks_fired", "Schedule ticks that started a run.", ["schedule"], registry=r)
        self.schedule_ticks_skipped = Counter("legato_schedule_ticks_skipped", "Schedule ticks that started no run, by reason: late (older than catchup), overlap (the previous run was still going), paused.", ["schedule", "reason"], registry=r)
        self.schedule_tick_lateness = Histogram("legato_schedule_tick_lateness_seconds", "How late a fired tick started its run: fired − tick time (jitter included).", ["schedule"], buckets=OVERHEAD_SECONDS + (5, 10, 30, 60, 300, 900, 3600), registry=r)
        self._server: Any = None

    # --- serving ----------------------------------------------------------------------------------

    def serve(self, port: int | None, addr: str = "0.0.0.0") -> bool:
        """Serve ``/metrics`` on ``port`` in a background thread; ``0`` or ``None`` disables it."""
        if not port:
            return False
        self._server = start_http_server(int(port), addr=addr, registry=self.registry)
        log.info("serving metrics on %s:%s/metrics", addr, port)
        return True

    # --- hooks called by the shell ----------------------------------------------------------------

    def _at(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, remembered: prometheus-client checks and converts the labels at every call
        (2-3 µs, several times per step). No series a hook touches is ever removed."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def schedule_fired(self, schedule: str, late_ms: int) -> None:
        self._at(self.schedule_ticks_fired, schedule).inc()
        self._at(self.schedule_tick_lateness, schedule).observe(max(0, late_ms) / 1000)

    def schedule_skipped(self, schedule: str, reason: str, n: int) -> None:
        self._at(self.schedule_ticks_skipped, schedule, reason).inc(n)

    def ignored(self, reason: str) -> None:
        self._at(self.events_ignored, reason).inc()

    def dead_letter(self, topic: str, reason: str) -> None:
        self._at(self.dead_letters, topic, reason_label(reason)).inc()

    def event_processed(self, kind: str) -> None:
        self._at(self.events, kind).inc()

    def activity_wait(self, activity: str, seconds: float) -> None:
        self._at(self.activity_wait_time, activity).observe(max(0.0, seconds))

    def activity_started(self, activity: str) -> None:
        self._at(self.activities_in_flight, activity).inc()

    def activity_finished(self, activity: str) -> None:
        self._at(self.activities_in_flight, activity).dec()

    def activity_done(self, activity: str, status: str, seconds: float, error_type: str | None = "") -> None:
        self._at(self.activity_execution, activity, status).observe(max(0.0, seconds))
        if status != "succeeded":
            self._at(self.activity_errors, activity, error_type or "unknown").inc()

    def activity_abandoned(self, activity: str) -> None:
        self._at(self.activities_abandoned, activity).inc()

    def payload_bytes(self, direction: str, n: int) -> None:
        self._at(self.payload_bytes_total, direction).inc(n)

    def progress_chunk(self, activity: str) -> None:
        self._at(self.progress_chunks, activity).inc()

    def limit_decided(self, state: Any, record: Any, grants: Iterable[Any]) -> None:
        """Count one decision of the limiter (``workflows.limiter.decide``): call it with the key's state after the
        decision (None when there is none), the record decided (a ``LimitAcquire``, a ``LimitRelease`` or None for a
        tick) and the grants it returned. Never raises."""
        try:
            grants = list(grants)
            use = self._limit_use
            for grant in grants:
                label = use.label(grant.limit, grant.key)
                self._at(self.limit_wait, grant.limit, label).observe(max(0, grant.waited_ms) / 1000)
                self._at(self.limit_grants, grant.limit).inc()
            if getattr(record, "type", None) == "limit.release" and state is not None and record.pause_ms:
                self._at(self.limit_pauses, record.limit).inc()
            if state is not None:
                use.decided(state, record, grants)
        except Exception:
            log.exception("metrics: cannot count a limiter decision")

    def limits_dropped(self, keys: Iterable[tuple[str, str]]) -> None:
        """This process no longer owns the ``(limit, key)`` budgets (its limiter partitions were revoked): stop
        reporting their use, which their new owner reports."""
        for limit, key in keys:
            self._limit_use.drop(limit, key)

    def cache_lookup(self, workflow: str, step: str, hit: bool) -> None:
        self._at(self.cache_hits if hit else self.cache_misses, workflow, step).inc()

    @staticmethod
    def observes_overhead(commands: Iterable[Any]) -> bool:
        """A completion's decision counts towards the per-step overhead when it requested the next activity."""
        return any(isinstance(c, RequestActivity) for c in commands)

    def orchestration_overhead(self, workflow: str, seconds: float) -> None:
        """Observe the overhead of one completion once its next request is on its way (handed to the early producer, or committed) (see ``observes_overhead``)."""
        self._at(self.overhead, workflow).observe(max(0.0, seconds))

    def runs_in_flight(self, n: int) -> None:
        self.in_flight_runs.set(n)

    def runs_retained(self, n: int) -> None:
        self.retained_runs.set(n)

    def count_runs(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Read ``legato_runs_in_flight`` and ``legato_runs_retained`` from ``counts()`` (running, retained) at each
        scrape: exact, and nothing to do between scrapes. ``counts`` runs on the scrape's thread; one that fails (a
        table changing under it) leaves the last values."""
        last = [0, 0]

        def read(i: int) -> float:
            try:
                last[:] = counts()
            except Exception:  # noqa: BLE001 - a scrape must not fail for a racing read
                pass
            return float(last[i])

        self.in_flight_runs.set_function(lambda: read(0))
        self.retained_runs.set_function(lambda: read(1))

    def run_forgotten(self, workflow: str) -> None:
        self._at(self.forgotten_runs, workflow).inc()

    def lag(self, group: str, topic: str, partition: int, value: float) -> None:
        self.consumer_lag.labels(group, topic, str(partition)).set(value)

    def decision(self, events: Iterable[DomainEvent], commands: Iterable[Any], overhead_seconds: float | None = None) -> None:
        """Count one decision of the state machine from its domain events (``Machine.decide_events``) and commands.

        ``overhead_seconds`` (completion received → its commands produced) is observed only when the event
        was a completion (the shell passes ``None`` otherwise) and the decision requested an activity.
        Never raises: a metrics bug must not dead-letter an event whose commands were already sent.
        """
        try:
            self._decision(list(events), list(commands), overhead_seconds)
        except Exception:
            log.exception("metrics: cannot count a decision")

    def _decision(self, events: list[DomainEvent], commands: list[Any], overhead_seconds: float | None) -> None:
        for command in commands:
            if isinstance(command, PublishRunEvent) and command.event.type == "run.started":
                self._at(self.runs_started, command.event.workflow).inc()
        if overhead_seconds is not None:
            requested = next((c.request.workflow for c in commands if isinstance(c, RequestActivity)), None)
            if requested is not None:
                self._at(self.overhead, requested).observe(max(0.0, overhead_seconds))
        for event in events:
            getattr(self, self._COUNTERS[type(event)])(event)

    def declare(self, workflows: Iterable[CompiledWorkflow]) -> None:
        """Create the series of every declared choice path at 0, so a path never taken shows as a dead path, and the
        cache hits and misses of every ``cache: {ttl}`` step, so a cache step never asked for shows at 0."""
        for wf in workflows:
            for step in wf.steps.values():
                if isinstance(step, ChoiceStep):
                    for path in declared_paths(step):
                        self._at(self.choice_paths, wf.name, step.id, path)
                elif isinstance(step, ActivityStep) and step.cache is not None:
                    self._at(self.cache_hits, wf.name, step.id)
                    self._at(self.cache_misses, wf.name, step.id)

    # --- one counter per domain event ---------------------------------------------------------------

    def _attempt_timed_out(self, event: AttemptTimedOut) -> None:
        self._at(self.attempt_timeouts, event.workflow, event.step_id, event.deadline).inc()

    def _attempt_rate_limited(self, event: AttemptRateLimited) -> None:
        self._at(self.rate_limited, event.workflow, event.step_id).inc()

    def _path_taken(self, event: PathTaken) -> None:
        self._at(self.choice_paths, event.workflow, event.step_id, event.path).inc()

    def _loop_ended(self, event: LoopEnded) -> None:
        for ending in LOOP_ENDINGS:  # every ending exists (at 0) once a loop has ended: ratios are defined
            self._at(self.loop_endings, event.workflow, event.step_id, ending)
        self._at(self.loop_endings, event.workflow, event.step_id, event.ended_by).inc()
        self._at(self.loop_iterations, event.workflow, event.step_id).observe(event.iterations)

    def _step_waiting(self, event: StepWaiting) -> None:
        self._at(self.runs_waiting, event.workflow, event.signal).inc()

    def _signal_ignored(self, event: SignalIgnored) -> None:
        self._at(self.signals_ignored, event.reason).inc()

    def _step_finished(self, event: StepFinished) -> None:
        workflow = event.workflow
        self._at(self.steps_finished, workflow, event.kind, event.step_id, event.status).inc()
        if event.status in FAILED_STEP_STATUSES:
            self._at(self.step_failures, workflow, event.kind, event.step_id, event.error_type or "unknown").inc()
        seconds = max(0, event.finished_ms - event.started_ms) / 1000
        if event.status in ("succeeded", "failed", "timed_out"):
            self._at(self.step_duration, workflow, event.kind, event.step_id).observe(seconds)
        if event.branches is not None and event.concurrent is not None:
            self._at(self.parallel_potential, workflow, event.step_id).observe(event.branches)
            self._at(self.parallel_achieved, workflow, event.step_id).observe(event.concurrent)
        if event.previous == "waiting":
            self._at(self.runs_waiting, workflow, event.signal or "").dec()
            self._at(self.wait_duration, workflow, event.signal or "", event.status).observe(seconds)

    def _run_finished(self, event: RunFinished) -> None:
        workflow = event.workflow if event.workflow_loaded else UNKNOWN_WORKFLOW
        outcome = event.status if event.status in ("succeeded", "cancelled") else "failed"
        self._at(self.run_duration, workflow, outcome).observe(max(0, event.finished_ms - event.started_ms) / 1000)
        if outcome == "succeeded":
            self._at(self.runs_completed, workflow).inc()
        elif outcome == "cancelled":
            self._at(self.runs_cancelled, workflow).inc()
        else:
            self._at(self.runs_failed, workflow, event.error_type or "unknown").inc()
        cost = event.cost or {}
        self._at(self.run_cost, workflow).observe(float(cost.get("usd", 0) or 0))
        self._at(self.run_tokens, workflow, "in").observe(int(cost.get("tokens_in", 0) or 0))
        self._at(self.run_tokens, workflow, "out").observe(int(cost.get("tokens_out", 0) or 0))
        # A sub-workflow's cost is also added to its parent run's: count the models of top-level runs only.
        models: Mapping[str, Any] = (cost.get("models") or {}) if event.top_level else {}
        for model, usd in models.items():
            self._at(self.cost_usd, workflow, str(model)).inc(max(0.0, float(usd or 0)))

    _COUNTERS: dict[type, str] = {
        AttemptRateLimited: "_attempt_rate_limited",
        AttemptTimedOut: "_attempt_timed_out",
        LoopEnded: "_loop_ended",
        PathTaken: "_path_taken",
        RunFinished: "_run_finished",
        SignalIgnored: "_signal_ignored",
        StepFinished: "_step_finished",
        StepWaiting: "_step_waiting",
    }


def declared_paths(step: ChoiceStep) -> list[str]:
    """Every path a choice step can take, as counted in ``legato_choice_paths``."""
    spec = step.choice
    paths = [f"case{i}" for i in range(len(spec.cases))] + [f"route:{name}" for name in spec.routes]
    return paths + ["default"]


def _sampled(gauge: Gauge, refresh: Callable[[], None]) -> Gauge:
    """``gauge``, its series recomputed by ``refresh`` whenever it is collected (a window that slides with the clock)."""
    collect = gauge.collect

    def collect_fresh() -> Any:
        refresh()
        return collect()

    gauge.collect = collect_fresh  # type: ignore[method-assign]
    return gauge


class _KeyUse:
    """What one process knows of one limit key it owns: its grants of the last window and its state's counts."""

    __slots__ = ("grants", "holders", "waiting")

    def __init__(self) -> None:
        self.grants: deque[list[Any]] = deque()  # [granted_ms, tokens, id], oldest first
        self.holders: dict[str, int] = {}  # id -> tokens charged, as of the last decision
        self.waiting = 0


class _LimitUse:
    """The use of each limit key this process's limiter owns, summed per exported ``key`` label at scrape time (in the
    metrics server's thread: a lock keeps it apart from the limiter's updates)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.keys: dict[tuple[str, str], _KeyUse] = {}
        self.labels: dict[str, set[str]] = {}  # limit -> the keys exported under their own label
        self.budgets: dict[str, dict[str, float]] = {}
        self.gauges: tuple[Gauge, ...] = ()
        self._reported: set[tuple[str, str]] = set()
        self._refreshed = -1.0
        self._lock = threading.RLock()

    def label(self, limit: str, key: str) -> str:
        """``key``, or ``"other"`` once LIMIT_KEYS other keys of ``limit`` have their own label (for the life of the
        process: a label never moves to another key)."""
        with self._lock:
            own = self.labels.setdefault(limit, set())
            if key in own:
                return key
            if len(own) < LIMIT_KEYS and key != OTHER_KEY:
                own.add(key)
                return key
            return OTHER_KEY

    def decided(self, state: Any, record: Any, grants: list[Any]) -> None:
        with self._lock:
            use = self.keys.get((state.limit, state.key))
            if use is None:
                use = self.keys[(state.limit, state.key)] = _KeyUse()
            if getattr(record, "type", None) == "limit.release" and record.cost is not None and record.id in use.holders:
                charged = use.holders[record.id]
                for entry in use.grants:  # the completion's real tokens replace the estimate charged at the grant
                    if entry[2] == record.id:
                        entry[1] += record.cost - charged
                        break
            for grant in grants:
                holder = state.holders.get(grant.id)
                use.grants.append([grant.granted_ms, holder.cost if holder is not None else 0, grant.id])
            use.holders = {h.id: h.cost for h in state.holders.values()}
            use.waiting = len(state.waiting)
            self._refreshed = -1.0  # the next scrape sees it
            self.budgets[state.limit] = {b: v for b in LIMIT_BUDGETS if (v := getattr(state, b, None)) is not None}

    def drop(self, limit: str, key: str) -> None:
        with self._lock:
            self.keys.pop((limit, key), None)
            self._refreshed = -1.0

    def refresh(self) -> None:
        with self._lock:
            now_ms = self.clock() * 1000
            if 0 <= now_ms - self._refreshed < 100:  # one scrape collects every gauge: compute once
                return
            self._refreshed = now_ms
            sums: dict[tuple[str, str], list[float]] = {}
            for (limit, key), use in list(self.keys.items()):
                while use.grants and use.grants[0][0] <= now_ms - LIMIT_WINDOW_MS:
                    use.grants.popleft()
                if not use.grants and not use.holders and not use.waiting:
                    del self.keys[(limit, key)]  # idle: nothing to report (its label stays reserved)
                    continue
                total = sums.setdefault((limit, self.label(limit, key)), [0, 0, 0, 0])
                total[0] += len(use.grants)
                total[1] += sum(entry[1] for entry in use.grants)
                total[2] += len(use.holders)
                total[3] += use.waiting
            requests, tokens, in_use, waiting, value = self.gauges
            for gauge, i in ((requests, 0), (tokens, 1), (in_use, 2), (waiting, 3)):
                for labels in self._reported - set(sums):  # keys idle, or handed to another process
                    gauge.remove(*labels)
                for labels, total in sums.items():
                    gauge.labels(*labels).set(total[i])
            self._reported = set(sums)
            value.clear()
            for limit in {limit for limit, _ in sums}:
                for budget, v in self.budgets.get(limit, {}).items():
                    value.labels(limit, budget).set(v)


class LagReporter:
    """Consumer lag of consumer groups (end offset − committed offset per topic partition) into a gauge.

    Run :meth:`run` as an asyncio task; every ``interval`` seconds it asks the broker for the groups'
    committed offsets and the partitions' end offsets. Errors are logged and retried on the next tick.
    """

    def __init__(self, bootstrap: str, group_ids: Iterable[str], metrics: Metrics, interval: float = 5.0):
        self.bootstrap = bootstrap
        self.group_ids = list(group_ids)
        self.metrics = metrics
        self.interval = interval
        self._admin: Any = None
        self._consumer: Any = None
        self._reported: set[tuple[str, str, str]] = set()

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.report_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the broker may be away for a while: try again on the next tick
                    log.warning("consumer lag not reported: %s: %s", type(exc).__name__, exc)
                    await self._close()
                await asyncio.sleep(self.interval)
        finally:
            await self._close()

    async def report_once(self) -> dict[tuple[str, str, int], int]:
        """Query the broker once, set the gauge and return ``{(group, topic, partition): lag}``."""
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        from legato.streams import security

        if self._admin is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **security.aiokafka_kwargs())
            await admin.start()
            self._admin = admin
        if self._consumer is None:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False, isolation_level="read_committed", **security.aiokafka_kwargs())
            await consumer.start()
            self._consumer = consumer
        lags: dict[tuple[str, str, int], int] = {}
        for group in self.group_ids:
            committed = await self._admin.list_consumer_group_offsets(group)
            tps = [tp for tp, meta in committed.items() if meta is not None and meta.offset >= 0]
            if not tps:
                continue
            ends = await self._consumer.end_offsets(tps)
            for tp in tps:
                lags[(group, tp.topic, tp.partition)] = max(0, ends[tp] - committed[tp].offset)
        seen = set()
        for (group, topic, partition), value in lags.items():
            self.metrics.lag(group, topic, partition, value)
            seen.add((group, topic, str(partition)))
        for labels in self._reported - seen:  # partitions no longer committed by the group (reassigned)
            try:
                self.metrics.consumer_lag.remove(*labels)
            except KeyError:
                pass
        self._reported = seen
        return lags

    async def _close(self) -> None:
        admin, consumer, self._admin, self._consumer = self._admin, self._consumer, None, None
        for client, stop in ((admin, "close"), (consumer, "stop")):
            if client is not None:
                try:
                    await getattr(client, stop)()
                except Exception:  # closing a broken client must not hide the real problem
                    pass
