"""What one turn of a partition's task decides and commits in one transaction, and how the changelog stores where
the partition's inputs resume (the record ``CHANGELOG_OFFSETS_KEY``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import TopicPartition

from legato.streams.coordinator.inbox import Send
from legato.workflows.commands import StartTimer
from legato.workflows.state import RunState


@dataclass
class Batch:
    """What one turn of a partition's task decided, committed in one transaction."""

    sends: list[Send] = field(default_factory=list)
    requested: list[Send] = field(default_factory=list)  # activity requests decided, sent early or in the transaction
    early: list[Send] = field(default_factory=list)  # requests sent ahead of the transaction (``Partitions.early``)
    mixed: set[str] = field(default_factory=set)  # runs an input other than a worker's completion changed, or a completion while a timer was due
    unsettled: set[str] = field(default_factory=set)  # ``mixed`` of the batch still committing when this one was decided
    early_futures: list[Any] = field(default_factory=list)  # deliveries of the early requests handed to the producer
    early_runs: set[str] = field(default_factory=set)  # the runs of ``early`` (counted in ``PartitionTask.early_runs`` until committed)
    received: float = float("inf")  # perf_counter when its first record was polled
    size: int = 0  # records decided into it
    changed: dict[str, RunState | None] = field(default_factory=dict)  # runs this batch changed (None: forgotten)
    written: dict[bytes, bytes | None] = field(default_factory=dict)  # run key → the state bytes it stores (None: a tombstone)
    running: int = 0  # runs started minus runs finished
    stored: int = 0  # runs started minus runs forgotten
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    group_offsets: bool = False  # the consumer group's offsets are committed in this transaction too
    timers: list[StartTimer] = field(default_factory=list)
    forks: bool = False  # a run.fork_requested was decided: a fork's seed may be in ``sends`` (its payloads are copied before the commit)
    overheads: list[tuple[str, str, float]] = field(default_factory=list)  # (workflow, run_id, perf_counter when polled) of each completion that requested the next activity
    stamps: dict[str, float] = field(default_factory=dict)  # hop → wall-clock seconds (only when tracing)
    requests: list[str] = field(default_factory=list)  # request ids produced (only when tracing)
    per: dict[str, dict[str, float]] = field(default_factory=dict)  # request id → its own hops (only when tracing)


def encode_offsets(offsets: dict[TopicPartition, int]) -> bytes:
    return orjson.dumps({f"{tp.topic}:{tp.partition}": o for tp, o in offsets.items()})


def decode_offsets(value: bytes | None) -> dict[TopicPartition, int]:
    out = {}
    for name, offset in (orjson.loads(value) if value else {}).items():
        topic, _, partition = name.rpartition(":")
        out[TopicPartition(topic, int(partition))] = int(offset)
    return out
