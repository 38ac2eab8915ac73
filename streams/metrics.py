"""Prometheus metrics of the coordinator and the workers (``prometheus_client``, own registry).

Names follow the Prometheus conventions: ``legato_`` prefix, base units (``_seconds``), counters end in
``_total``. Labels stay bounded — workflow, step (the step id, never a step key with loop iterations), step
kind, activity, path, outcome, error type, model, topic, reason — and never carry a run_id. docs/metrics.md
lists every metric.

The shell calls the hooks; :meth:`Metrics.decision` derives the run-level metrics from the old and the new
``RunState`` of one decision and its commands, so the state machine itself stays free of metrics.
"""
from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Iterable, Mapping

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from legato.workflows.machine import PublishRunEvent, RequestActivity
from legato.workflows.state import RunState, StepState

log = logging.getLogger("legato.metrics")

UNKNOWN_WORKFLOW = "_unknown_"
"""The ``workflow`` label of runs triggered for a workflow that is not loaded (keeps the label bounded)."""

FAILED_STEP_STATUSES = ("failed", "timed_out")
FINISHED_STEP_STATUSES = ("succeeded", "failed", "timed_out", "cancelled", "skipped")
LOOP_ENDINGS = ("until", "max_iterations", "items", "timeout", "no_progress", "budget", "failed")

# Buckets in base units.
RUN_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
ACTIVITY_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
OVERHEAD_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
ITERATIONS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 50, 100, 1000)
CONCURRENCY = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)
USD = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TOKENS = (10, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000)

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
        # runs
        self.runs_started = Counter("legato_runs_started", "Runs started (run.started published).", ["workflow"], registry=r)
        self.runs_completed = Counter("legato_runs_completed", "Runs that finished successfully.", ["workflow"], registry=r)
        self.runs_failed = Counter("legato_runs_failed", "Runs that failed, by the run's error type.", ["workflow", "error_type"], registry=r)
        self.runs_cancelled = Counter("legato_runs_cancelled", "Runs cancelled (by their parent run or a run.cancel_requested record).", ["workflow"], registry=r)
        self.run_duration = Histogram("legato_run_duration_seconds", "End-to-end run duration (accepted → terminal).", ["workflow", "outcome"], buckets=RUN_SECONDS, registry=r)
        self.in_flight_runs = Gauge("legato_runs_in_flight", "Runs in the coordinator's run table that are still running.", registry=r)
        # steps and patterns
        self.steps_finished = Counter("legato_steps_finished", "Steps that reached a terminal status.", ["workflow", "kind", "step", "status"], registry=r)
        self.step_failures = Counter("legato_step_failures", "Steps that failed or timed out, by error type.", ["workflow", "kind", "step", "error_type"], registry=r)
        self.step_duration = Histogram("legato_step_duration_seconds", "Step duration from start to terminal status (all attempts).", ["workflow", "kind", "step"], buckets=RUN_SECONDS, registry=r)
        self.choice_paths = Counter("legato_choice_paths", "Paths taken by choice steps (caseN, route:NAME, default; undeclared routes count as default).", ["workflow", "step", "path"], registry=r)
        self.loop_iterations = Histogram("legato_loop_iterations", "Iterations a loop ran before it ended.", ["workflow", "step"], buckets=ITERATIONS, registry=r)
        self.loop_endings = Counter("legato_loop_endings", "How loops ended: until, max_iterations, timeout, failed.", ["workflow", "step", "ended_by"], registry=r)
        self.parallel_potential = Histogram("legato_parallel_potential_concurrency", "Branches of a finished parallel step (the concurrency it could reach).", ["workflow", "step"], buckets=CONCURRENCY, registry=r)
        self.parallel_achieved = Histogram("legato_parallel_achieved_concurrency", "Most branches of a parallel step that had an activity in flight at the same time.", ["workflow", "step"], buckets=CONCURRENCY, registry=r)
        # cost
        self.run_cost = Histogram("legato_run_cost_usd", "Cost of one finished run in US dollars.", ["workflow"], buckets=USD, registry=r)
        self.run_tokens = Histogram("legato_run_tokens", "Tokens of one finished run, by direction (in, out).", ["workflow", "direction"], buckets=TOKENS, registry=r)
        self.cost_usd = Counter("legato_cost_usd", "Cost of finished runs in US dollars, by model.", ["workflow", "model"], registry=r)
        # engine health
        self.events = Counter("legato_coordinator_events", "Events the coordinator processed: trigger, completion, timer.", ["kind"], registry=r)
        self.events_ignored = Counter("legato_events_ignored", "Events dropped as duplicate, stale, replayed or re-keyed, by reason.", ["reason"], registry=r)
        self.dead_letters = Counter("legato_dead_letters", "Messages sent to the dead-letter topic, by source topic and reason.", ["topic", "reason"], registry=r)
        self.overhead = Histogram("legato_step_overhead_seconds", "Orchestration overhead: completion received → next request produced.", ["workflow"], buckets=OVERHEAD_SECONDS, registry=r)
        self.consumer_lag = Gauge("legato_consumer_lag", "Records not yet committed by the process's consumer group (end offset − committed offset).", ["group", "topic", "partition"], registry=r)
        # activities (workers)
        self.activity_wait_time = Histogram("legato_activity_wait_seconds", "Queue time: request produced → handler starts.", ["activity"], buckets=ACTIVITY_SECONDS, registry=r)
        self.activity_execution = Histogram("legato_activity_execution_seconds", "Handler execution time, by outcome (succeeded, failed).", ["activity", "status"], buckets=ACTIVITY_SECONDS, registry=r)
        self.activity_errors = Counter("legato_activity_errors", "Failed activity executions, by error type.", ["activity", "error_type"], registry=r)
        self.progress_chunks = Counter("legato_progress_chunks", "Progress chunks handlers reported (sent to legato.progress), by activity.", ["activity"], registry=r)
        self.activities_in_flight = Gauge("legato_activities_in_flight", "Activity handlers running in this process.", ["activity"], registry=r)
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

    def ignored(self, reason: str) -> None:
        self.events_ignored.labels(reason).inc()

    def dead_letter(self, topic: str, reason: str) -> None:
        self.dead_letters.labels(topic, reason_label(reason)).inc()

    def event_processed(self, kind: str) -> None:
        self.events.labels(kind).inc()

    def activity_wait(self, activity: str, seconds: float) -> None:
        self.activity_wait_time.labels(activity).observe(max(0.0, seconds))

    def activity_started(self, activity: str) -> None:
        self.activities_in_flight.labels(activity).inc()

    def activity_finished(self, activity: str) -> None:
        self.activities_in_flight.labels(activity).dec()

    def activity_done(self, activity: str, status: str, seconds: float, error_type: str | None = "") -> None:
        self.activity_execution.labels(activity, status).observe(max(0.0, seconds))
        if status != "succeeded":
            self.activity_errors.labels(activity, error_type or "unknown").inc()

    def progress_chunk(self, activity: str) -> None:
        self.progress_chunks.labels(activity).inc()

    @staticmethod
    def observes_overhead(commands: Iterable[Any]) -> bool:
        """A completion's decision counts towards the per-step overhead when it requested the next activity."""
        return any(isinstance(c, RequestActivity) for c in commands)

    def orchestration_overhead(self, workflow: str, seconds: float) -> None:
        """Observe the overhead of one completion once its requests are committed (see ``observes_overhead``)."""
        self.overhead.labels(workflow).observe(max(0.0, seconds))

    def runs_in_flight(self, n: int) -> None:
        self.in_flight_runs.set(n)

    def lag(self, group: str, topic: str, partition: int, value: float) -> None:
        self.consumer_lag.labels(group, topic, str(partition)).set(value)

    @staticmethod
    def snapshot(state: RunState | None) -> RunState | None:
        """What ``decision`` needs of the state before an in-place decision: its status, path and steps."""
        if state is None:
            return None
        return state.model_copy(update={"path": list(state.path), "steps": {k: v.model_copy() for k, v in state.steps.items()}})

    def decision(self, old: RunState | None, new: RunState | None, commands: Iterable[Any], now_ms: int, overhead_seconds: float | None = None) -> None:
        """Derive run, step and pattern metrics from one decision of the state machine.

        ``overhead_seconds`` (completion received → its commands produced) is observed only when the event
        was a completion (the shell passes ``None`` otherwise) and the decision requested an activity.
        Never raises: a metrics bug must not dead-letter an event whose commands were already sent.
        """
        try:
            self._decision(old, new, list(commands), now_ms, overhead_seconds)
        except Exception:
            log.exception("metrics: cannot derive metrics from a decision of run %s", (new or old).run_id if (new or old) else "?")

    def _decision(self, old: RunState | None, new: RunState | None, commands: list[Any], now_ms: int, overhead_seconds: float | None) -> None:
        for command in commands:
            if isinstance(command, PublishRunEvent) and command.event.type == "run.started":
                self.runs_started.labels(command.event.workflow).inc()
        if new is None or new is old:
            return
        workflow = _workflow_label(new)
        if overhead_seconds is not None and self.observes_overhead(commands):
            self.overhead.labels(workflow).observe(max(0.0, overhead_seconds))
        old_path = old.path if old is not None else []
        for entry in new.path[len(old_path):]:
            step_id, _, path = entry.partition(":")
            self.choice_paths.labels(workflow, step_id, path or "default").inc()
        old_steps = old.steps if old is not None else {}
        for key, step in new.steps.items():
            before = old_steps.get(key)
            if step.status not in FINISHED_STEP_STATUSES or (before is not None and before.status in FINISHED_STEP_STATUSES):
                continue
            self._step_finished(workflow, new, step, now_ms)
        for key, before in old_steps.items():
            if key in new.steps or before.status in FINISHED_STEP_STATUSES:
                continue
            # The machine drops a finished frame (a loop iteration, a map item, a retried branch) with its steps
            # in the decision that finished it: the step's last status is in the CEL view.
            status = (new.view.get(before.step_id) or {}).get("status")
            if status in FINISHED_STEP_STATUSES:
                self._step_finished(workflow, old, before.model_copy(update={"status": status, "finished_ms": now_ms}), now_ms)
        if new.finished and (old is None or not old.finished):
            self._run_finished(workflow, new, now_ms)

    # --- derived ----------------------------------------------------------------------------------

    def _step_finished(self, workflow: str, state: RunState, step: StepState, now_ms: int) -> None:
        self.steps_finished.labels(workflow, step.kind, step.step_id, step.status).inc()
        if step.status in FAILED_STEP_STATUSES:
            error_type = step.error.type if step.error is not None else "unknown"
            self.step_failures.labels(workflow, step.kind, step.step_id, error_type).inc()
        if step.status in ("succeeded", "failed", "timed_out"):
            finished = step.finished_ms if step.finished_ms is not None else now_ms
            self.step_duration.labels(workflow, step.kind, step.step_id).observe(max(0, finished - step.started_ms) / 1000)
        if step.kind == "loop" and step.status != "cancelled" and step.status != "skipped":
            ended_by = step.ended_by or ("failed" if step.status in FAILED_STEP_STATUSES else "until")
            for ending in LOOP_ENDINGS:  # every ending exists (at 0) once a loop has ended: ratios are defined
                self.loop_endings.labels(workflow, step.step_id, ending)
            self.loop_endings.labels(workflow, step.step_id, ended_by).inc()
            self.loop_iterations.labels(workflow, step.step_id).observe((step.iteration or 0) + 1)
        if step.kind == "parallel" and step.status in ("succeeded", "failed", "timed_out") and step.children:
            potential, achieved = parallel_concurrency(state, step, now_ms)
            self.parallel_potential.labels(workflow, step.step_id).observe(potential)
            self.parallel_achieved.labels(workflow, step.step_id).observe(achieved)

    def _run_finished(self, workflow: str, state: RunState, now_ms: int) -> None:
        finished = state.finished_ms if state.finished_ms is not None else now_ms
        outcome = state.status if state.status in ("succeeded", "cancelled") else "failed"
        self.run_duration.labels(workflow, outcome).observe(max(0, finished - state.started_ms) / 1000)
        if outcome == "succeeded":
            self.runs_completed.labels(workflow).inc()
        elif outcome == "cancelled":
            self.runs_cancelled.labels(workflow).inc()
        else:
            self.runs_failed.labels(workflow, state.error.type if state.error is not None else "unknown").inc()
        cost = state.cost or {}
        self.run_cost.labels(workflow).observe(float(cost.get("usd", 0) or 0))
        self.run_tokens.labels(workflow, "in").observe(int(cost.get("tokens_in", 0) or 0))
        self.run_tokens.labels(workflow, "out").observe(int(cost.get("tokens_out", 0) or 0))
        # A sub-workflow's cost is also added to its parent run's: count the models of top-level runs only.
        models: Mapping[str, Any] = (cost.get("models") or {}) if state.parent is None else {}
        for model, usd in models.items():
            self.cost_usd.labels(workflow, str(model)).inc(max(0.0, float(usd or 0)))


def _workflow_label(state: RunState) -> str:
    if state.version == 0 and state.error is not None and state.error.type == "UnknownWorkflow":
        return UNKNOWN_WORKFLOW
    return state.workflow


def parallel_concurrency(state: RunState, step: StepState, now_ms: int) -> tuple[int, int]:
    """(potential, achieved) concurrency of a parallel step.

    Potential: its number of branches. Achieved: the most branches that had an activity in flight at one
    instant, from the activity steps' started/finished timestamps (intervals are half-open; every attempt of a
    step counts from the step's start).
    """
    branches = list(step.children)
    # a branch restarted by on_failure: retry is the frame "<step>/<name>~<attempt>": same branch
    intervals: dict[str, list[tuple[int, int]]] = {b.split("~", 1)[0]: [] for b in branches}
    for other in state.steps.values():
        if other.kind != "activity" or other.attempt < 1:
            continue
        for branch in branches:
            if other.key.startswith(branch + "/"):
                end = other.finished_ms if other.finished_ms is not None else now_ms
                intervals[branch.split("~", 1)[0]].append((other.started_ms, max(end, other.started_ms + 1)))
                break
    starts = sorted({s for spans in intervals.values() for s, _ in spans})
    achieved = 0
    for t in starts:
        active = sum(1 for spans in intervals.values() if any(s <= t < e for s, e in spans))
        achieved = max(achieved, active)
    potential = max(getattr(step, "total", 0) or 0, len({b.split("~", 1)[0] for b in branches}))
    return potential, achieved


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
