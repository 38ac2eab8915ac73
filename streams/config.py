"""Settings from the command line and the environment (LEGATO_*): the one place Legato reads its environment.

The security variables (LEGATO_SECURITY_PROTOCOL, LEGATO_SASL_*, LEGATO_SSL_*) are read and checked by
``streams/security.py`` (``security.from_env``), which every Kafka client's keyword arguments come from; they are
kept there so that a secret never sits in a settings object that gets printed."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from legato.streams import security
from legato.streams.admin import Replication

from legato.topics.payloads import DEFAULT_INLINE_MAX, Payloads, store_from_url
from legato.topics.names import DEFAULT_PARTITIONS, DEFAULT_PREFIX, Topics
from legato.workflows.durations import parse_duration
from legato.workflows.lifecycle import DEFAULT_RETENTION_S


def _positive(env: Mapping[str, str], name: str) -> int | None:
    """An optional whole number ≥ 1 from the environment; a clear error otherwise."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}={raw!r}: expected a whole number of at least 1")
    return value


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "legato"


@dataclass
class Settings:
    bootstrap: str = "localhost:9092"
    prefix: str = DEFAULT_PREFIX
    partitions: int = DEFAULT_PARTITIONS
    workflow_dirs: list[str] = field(default_factory=list)
    handler_modules: list[str] = field(default_factory=list)
    data_dir: Path = field(default_factory=lambda: _cache_dir() / "data")
    metrics_port: int | None = None
    loglevel: str = "warning"
    store: str = "memory"  # the run table's local store: memory, or rocksdb (on disk, through rocksdict)
    session_timeout: float = 6.0  # seconds before a killed process's partitions move: the lowest a stock broker accepts (docs/deploy.md)
    linger_ms: float = 0.0  # workers' producer linger: 0 favours per-step latency, a few ms throughput
    commit_interval: float = 0.5  # workers: seconds between offset commits
    worker_drain_s: float = 30.0  # workers: on SIGTERM, how long handlers already running may take to finish (streams/worker.py, Workers.drain)
    worker_stop_s: float = 10.0  # workers: after the drain, how long the rest of the stop may take before the process exits anyway (streams/stop_deadline.py)
    retention_s: float = DEFAULT_RETENTION_S  # how long a finished run is kept when its workflow sets no `retention`
    console_port: int = 8080  # `legato dev` serves the console here
    trace_file: Path | None = None  # the coordinator appends one JSON line per committed batch here (`legato bench latency`)
    early_requests: bool = True  # requests caused only by completions are sent ahead of the transaction (docs/concepts/guarantees.md)
    state_commit_ms: float = 50.0  # coordinator: how long a transaction of nothing but run states waits for more (partition.STATE_COMMIT_S)
    replication_factor: int | None = None  # of the topics Legato creates; None: 3, or the number of brokers when fewer
    min_insync_replicas: int | None = None  # their min.insync.replicas; None: the factor - 1, at least 1
    payload_inline_max: int = DEFAULT_INLINE_MAX  # bytes of a value's JSON above which it travels by reference (docs/payloads.md)
    payload_store: str = "kafka"  # where those values live: kafka (<prefix>.payloads), file:///path, or none

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    @property
    def replication(self) -> Replication:
        return Replication(self.replication_factor, self.min_insync_replicas)

    def payloads(self, metrics: object = None) -> Payloads | None:
        """The payload store of this process (claim checks), counting bytes into ``metrics`` when given; None with
        ``LEGATO_PAYLOAD_STORE=none``."""
        store = store_from_url(self.payload_store, self.bootstrap, self.topics.payloads, **security.aiokafka_kwargs())
        return Payloads(store, self.payload_inline_max, getattr(metrics, "payload_bytes", None)) if store is not None else None

    @classmethod
    def from_env(cls, workflows: list[str] | None = None, handlers: list[str] | None = None) -> "Settings":
        env = os.environ
        wf = list(workflows or []) or [p for p in env.get("LEGATO_WORKFLOWS", "").split(os.pathsep) if p]
        hd = list(handlers or []) or [m.strip() for m in env.get("LEGATO_HANDLERS", "").split(",") if m.strip()]
        port = env.get("LEGATO_METRICS_PORT")
        return cls(
            bootstrap=env.get("LEGATO_BOOTSTRAP", "localhost:9092"),
            prefix=env.get("LEGATO_TOPIC_PREFIX", DEFAULT_PREFIX),
            partitions=int(env.get("LEGATO_PARTITIONS", DEFAULT_PARTITIONS)),
            workflow_dirs=wf,
            handler_modules=hd,
            data_dir=Path(env["LEGATO_DATA_DIR"]) if env.get("LEGATO_DATA_DIR") else _cache_dir() / "data",
            metrics_port=int(port) if port else None,
            loglevel=env.get("LEGATO_LOGLEVEL", "warning"),
            store=env.get("LEGATO_STORE", "memory"),
            session_timeout=float(env.get("LEGATO_SESSION_TIMEOUT", "6")),
            linger_ms=float(env.get("LEGATO_LINGER_MS", "0")),
            commit_interval=float(env.get("LEGATO_COMMIT_INTERVAL", "0.5")),
            worker_drain_s=float(env.get("LEGATO_WORKER_DRAIN_S", "30")),
            worker_stop_s=float(env.get("LEGATO_WORKER_STOP_S", "10")),
            console_port=int(env.get("LEGATO_CONSOLE_PORT", "8080")),
            trace_file=Path(env["LEGATO_TRACE_FILE"]) if env.get("LEGATO_TRACE_FILE") else None,
            early_requests=env.get("LEGATO_EARLY_REQUESTS", "1") not in ("0", "false", "no", "off"),
            state_commit_ms=float(env.get("LEGATO_STATE_COMMIT_MS", "50")),
            replication_factor=_positive(env, "LEGATO_REPLICATION_FACTOR"),
            min_insync_replicas=_positive(env, "LEGATO_MIN_INSYNC_REPLICAS"),
            payload_inline_max=int(env.get("LEGATO_PAYLOAD_INLINE_MAX", DEFAULT_INLINE_MAX)),
            payload_store=env.get("LEGATO_PAYLOAD_STORE", "kafka"),
            retention_s=parse_duration(env["LEGATO_RETENTION"]) if env.get("LEGATO_RETENTION") else DEFAULT_RETENTION_S,
        )
