"""Builds a process for a role: coordinator, worker, or both (``legato dev``).

The workers are a faust app; the coordinator is its own transactional aiokafka loop (streams/coordinator.py), run
as a task of the faust app in ``legato dev`` and on its own event loop in ``legato coordinator``."""
from __future__ import annotations

import asyncio
import gc
import signal
import logging
from dataclasses import dataclass

import faust

from legato.handlers.registry import Activity, load_handler_modules
from legato.streams import kafka_io, security
from legato.streams.admin import TopicMismatch, ensure_topics
from legato.streams.config import Settings
from legato.streams.coordinator import Coordinator
from legato.streams.definitions import DeployRefused, deploy_files, read_catalog
from legato.streams.dlq import DeadLetters
from legato.streams.metrics import LagReporter, Metrics
from legato.streams.worker import Workers
from legato.workflows.catalog import Catalog
from legato.workflows.model import CompiledWorkflow, load_directories

COORDINATOR_GC_THRESHOLDS = (50_000, 50, 100)
"""The coordinator's ``gc.set_threshold``: see ``_run_coordinator``."""


@dataclass
class Legato:
    app: faust.App | None
    coordinator: Coordinator | None
    workers: Workers | None
    workflows: dict[str, CompiledWorkflow]
    activities: dict[str, Activity]


def build(settings: Settings, *, coordinator: bool, worker: bool, only_activities: list[str] | None = None) -> Legato:
    """Load definitions and handlers, create the topics, and wire the agents; nothing runs yet."""
    if coordinator:
        catalog = asyncio.run(_deployed(settings))
        workflows = {name: catalog.latest(name).workflow for name in catalog.names()}
        used = [d.workflow for d in catalog]
    else:
        workflows = load_directories(settings.workflow_dirs) if settings.workflow_dirs else {}
        used = list(workflows.values())
    activities: dict[str, Activity] = load_handler_modules(settings.handler_modules) if worker else {}
    if only_activities:
        unknown = sorted(set(only_activities) - set(activities))
        if unknown:
            raise SystemExit(f"no handler registered for activity {unknown[0]!r} (modules: {settings.handler_modules})")
        activities = {name: activities[name] for name in only_activities}
    role = "dev" if coordinator and worker else "coordinator" if coordinator else "worker"
    if role == "worker" and only_activities:
        role = "worker-" + "-".join(sorted(only_activities))
    needed = sorted({a for wf in used for a in wf.activities} | set(activities))
    completion_topics = sorted({wf.definition.completion_topic for wf in used if wf.definition.completion_topic})
    changelog = [settings.topics.changelog] if coordinator else []
    try:
        factor = asyncio.run(ensure_topics(settings.bootstrap, settings.topics, needed, settings.partitions, completion_topics,
                                           compacted=changelog, replication=settings.replication))
    except TopicMismatch as exc:
        raise SystemExit(f"legato {role}: {exc}") from None
    metrics = Metrics() if settings.metrics_port else None
    coord = Coordinator(settings, metrics) if coordinator else None
    if not (worker and activities):
        if coord is None:
            raise SystemExit("nothing to run: no workflows for a coordinator and no activities for a worker")
        return Legato(None, coord, None, workflows, activities)
    datadir = settings.data_dir / f"{settings.prefix}-{role}"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{settings.prefix}-{role}",
        broker=[f"kafka://{b.strip()}" for b in settings.bootstrap.split(",")],
        store="rocksdb://" if settings.store == "rocksdb" else "memory://",  # rocksdb:// uses rocksdict when installed
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_replication_factor=factor,  # faust's own topics (its leader topic) like Legato's
        producer_acks=-1,  # acks=all: a completion is acknowledged once every in-sync replica has it
        topic_allow_declare=True,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        broker_credentials=security.faust_credentials(),
        producer_linger=settings.linger_ms / 1000,
        broker_commit_interval=settings.commit_interval,
        stream_wait_empty=False,
        consumer_auto_offset_reset="earliest",
        stream_recovery_delay=0.0,
        # a killed process's partitions move after this; faust's 60 s default stalls every run on them that long
        broker_session_timeout=settings.session_timeout,
        broker_heartbeat_interval=settings.session_timeout / 4,
    )
    kafka_io.faust_read_committed()
    kafka_io.faust_idempotent_producer()
    dlq = DeadLetters(app, settings.topics.dlq, metrics)
    workers = Workers(app, settings.topics, activities, settings.partitions, dlq, metrics, settings.bootstrap, settings.payloads(metrics),
                      drain_s=settings.worker_drain_s, stop_s=settings.worker_stop_s)
    if metrics is not None:
        groups = [app.conf.id] + ([coord.group] if coord is not None else [])
        async def serve_metrics() -> None:
            await _serve_metrics(settings, metrics, groups)

        app.task(serve_metrics)
    if coord is not None:
        app.task(coord.serve)
    return Legato(app, coord, workers, workflows, activities)


async def _deployed(settings: Settings) -> Catalog:
    """Deploy the ``--workflows`` files under ``legato deploy``'s rules (a file whose name@version is deployed with
    other content stops the start, naming it), then read every deployed definition: files and Kafka never disagree
    silently. The catalog read here gives the topics to create; the coordinator itself follows the table."""
    kafka = security.aiokafka_kwargs()
    try:
        await ensure_topics(settings.bootstrap, settings.topics, [], settings.partitions, replication=settings.replication)
    except TopicMismatch as exc:
        raise SystemExit(f"legato: {exc}") from None
    if settings.workflow_dirs:
        try:
            await deploy_files(settings.workflow_dirs, settings.bootstrap, settings.topics, kafka=kafka)
        except DeployRefused as exc:
            raise SystemExit(f"legato: the workflow files disagree with {settings.topics.definitions}: {exc}") from None
    return (await read_catalog(settings.bootstrap, settings.topics, kafka=kafka)).catalog


async def _serve_metrics(settings: Settings, metrics: Metrics, groups: list[str]) -> None:
    """/metrics on LEGATO_METRICS_PORT, and the consumer lag of this process's groups every 5 s."""
    metrics.serve(settings.metrics_port)
    await LagReporter(settings.bootstrap, groups, metrics).run()


def run(legato: Legato, loglevel: str = "warning") -> None:
    """Run until SIGTERM/SIGINT."""
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    security.install_redaction()
    if legato.app is None:
        assert legato.coordinator is not None
        _run_coordinator(legato.coordinator, loglevel)
        return
    # the first SIGTERM or SIGINT drains the activity workers (Workers.drain: no new request starts, the handlers
    # running finish within LEGATO_WORKER_DRAIN_S and are committed) before faust's stop leaves the group; the process
    # exits LEGATO_WORKER_STOP_S after the drain even if that stop hangs (Workers.stop)
    drain = legato.workers.stop if legato.workers is not None else None
    worker = kafka_io.faust_worker_draining_first(legato.app, drain, loglevel=loglevel, quiet=True, redirect_stdouts=False)

    @legato.app.task
    async def _quiet_libraries() -> None:
        # The worker's logging setup leaves the client libraries' loggers at DEBUG: every send would build a
        # log record (7 % of the coordinator's time in a profile). Pin them to the chosen level.
        for name in ("aiokafka", "faust", "mode"):
            logging.getLogger(name).setLevel(loglevel.upper())

    worker.execute_from_commandline()


def _run_coordinator(coordinator: Coordinator, loglevel: str) -> None:
    """The coordinator alone, on its own event loop; SIGTERM and SIGINT stop it cleanly (leaving the group)."""
    for name in ("aiokafka", "kafka"):
        logging.getLogger(name).setLevel(loglevel.upper())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        serving = asyncio.create_task(coordinator.serve())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, serving.cancel)
        tasks = []
        if coordinator.metrics is not None:
            tasks.append(asyncio.create_task(_serve_metrics(coordinator.settings, coordinator.metrics, [coordinator.group])))
        try:
            await serving
        except asyncio.CancelledError:
            pass
        finally:
            for t in tasks:
                t.cancel()

    # The decoded run states and their pydantic objects are long-lived: with CPython's default thresholds
    # (700, 10, 10) the collector walks them again and again under load. Collect the young generation every 50,000
    # allocations instead: `legato bench throughput --runs 2000` 5,806 / 4,816 → 6,761 / 5,968 steps/s (default /
    # (50,000, 50, 1,000), alternated; the committed third threshold, 100, is what BENCHMARKS.md's final rows ran).
    # Cycles are still collected, later; `legato bench memory` (RSS per run in flight) did not grow with it.
    gc.set_threshold(*COORDINATOR_GC_THRESHOLDS)
    asyncio.run(main())
