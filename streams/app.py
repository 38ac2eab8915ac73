"""Builds the faust app for a role: coordinator, worker, or both (``legato dev``)."""
from __future__ import annotations

import asyncio
import os
import logging
from dataclasses import dataclass
from typing import Any

import faust

from handlers.registry import Activity, load_handler_modules
from streams import security
from streams.admin import ensure_topics
from streams.config import Settings
from streams.coordinator import Coordinator
from streams.dlq import DeadLetters
from streams.metrics import LagReporter, Metrics
from streams.worker import Workers
from workflows.model import CompiledWorkflow, load_directories


@dataclass
class Legato:
    app: faust.App
    coordinator: Coordinator | None
    workers: Workers | None
    workflows: dict[str, CompiledWorkflow]
    activities: dict[str, Activity]


def build(settings: Settings, *, coordinator: bool, worker: bool, only_activities: list[str] | None = None) -> Legato:
    """Load definitions and handlers, create the topics, and wire the agents; nothing runs yet."""
    workflows = load_directories(settings.workflow_dirs) if settings.workflow_dirs else {}
    activities: dict[str, Activity] = load_handler_modules(settings.handler_modules) if worker else {}
    if only_activities:
        unknown = sorted(set(only_activities) - set(activities))
        if unknown:
            raise SystemExit(f"no handler registered for activity {unknown[0]!r} (modules: {settings.handler_modules})")
        activities = {name: activities[name] for name in only_activities}
    role = "dev" if coordinator and worker else "coordinator" if coordinator else "worker"
    if role == "worker" and only_activities:
        role = "worker-" + "-".join(sorted(only_activities))
    needed = sorted({a for wf in workflows.values() for a in wf.activities} | set(activities))
    completion_topics = sorted({wf.definition.completion_topic for wf in workflows.values() if wf.definition.completion_topic})
    # faust creates the run table's changelog lazily and, on a freshly started broker, sometimes not at all
    # (every table write then fails): create it with the other topics, compacted like faust would.
    changelog = [f"{settings.prefix}-{role}-runs-changelog"] if coordinator else []
    asyncio.run(ensure_topics(settings.bootstrap, settings.topics, needed, settings.partitions, completion_topics, compacted=changelog))
    datadir = settings.data_dir / f"{settings.prefix}-{role}"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{settings.prefix}-{role}",
        broker=[f"kafka://{b.strip()}" for b in settings.bootstrap.split(",")],
        store="rocksdb://" if settings.store == "rocksdb" else "memory://",  # rocksdb:// uses rocksdict when installed
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        topic_allow_declare=True,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        broker_credentials=security.faust_credentials(),
        producer_linger=float(os.environ.get("LEGATO_LINGER_MS", "0")) / 1000,
        broker_commit_interval=float(os.environ.get("LEGATO_COMMIT_INTERVAL", "0.5")),
        stream_wait_empty=False,
        consumer_auto_offset_reset="earliest",
        stream_recovery_delay=0.0,
        # a killed process's partitions move after this; faust's 60 s default stalls every run on them that long
        broker_session_timeout=float(os.environ.get("LEGATO_SESSION_TIMEOUT", "10")),
        broker_heartbeat_interval=float(os.environ.get("LEGATO_SESSION_TIMEOUT", "10")) / 4,
    )
    metrics = Metrics() if settings.metrics_port else None
    dlq = DeadLetters(app, settings.topics.dlq, metrics)
    coord = Coordinator(app, settings.topics, workflows, settings.partitions, dlq, metrics) if coordinator else None
    workers = Workers(app, settings.topics, activities, settings.partitions, dlq, metrics, settings.bootstrap) if worker and activities else None
    if metrics is not None:
        async def serve_metrics() -> None:
            """/metrics on LEGATO_METRICS_PORT, and this process's consumer lag every 5 s."""
            metrics.serve(settings.metrics_port)
            await LagReporter(settings.bootstrap, [app.conf.id], metrics).run()

        app.task(serve_metrics)
    return Legato(app, coord, workers, workflows, activities)


def run(legato: Legato, loglevel: str = "warning") -> None:
    """Run the app until SIGTERM/SIGINT."""
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    security.install_redaction()
    worker = faust.Worker(legato.app, loglevel=loglevel, quiet=True, redirect_stdouts=False)

    @legato.app.task
    async def _quiet_libraries() -> None:
        # The worker's logging setup leaves the client libraries' loggers at DEBUG: every send would build a
        # log record (7 % of the coordinator's time in a profile). Pin them to the chosen level.
        for name in ("aiokafka", "faust", "mode"):
            logging.getLogger(name).setLevel(loglevel.upper())

    worker.execute_from_commandline()
