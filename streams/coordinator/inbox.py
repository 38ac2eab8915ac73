"""Input records decoded into the machine's events; what cannot be decoded is dead-lettered with the reason."""
from __future__ import annotations

import uuid
from typing import Any

from legato.streams.dlq import dead_letter
from legato.streams.kafka_io import partition_for
from legato.topics import codec
from legato.topics.codec import DecodeError
from legato.topics.models import ActivityCompleted, ActivityHeartbeat, ActivityStarted, ChildRunFinished, RunAccepted, RunCancelRequested, RunForkAccepted, RunForkRequested, RunRedriveRequested, RunRequested, SignalSent, TimerFired
from legato.topics.limits import LimitGranted
from legato.topics.names import Topics

Send = tuple[str, bytes | None, bytes, int | None]
"""A record to produce in the batch's transaction: topic, key, value, partition (None: by key)."""

_COMPLETIONS_RECORDS = {"activity.started": ActivityStarted, "activity.heartbeat": ActivityHeartbeat}
"""The records on the completions topic that carry a ``type``; one without (or with any other) is a completion."""

_RUN_ID_NAMESPACE = uuid.UUID("6f1c5a3e-8d0b-4c1e-9b7a-1e2d3c4b5a69")

_COORDINATOR_RECORDS = {
    "run.accepted": RunAccepted,
    "timer.fired": TimerFired,
    "child.finished": ChildRunFinished,
    "run.cancel_requested": RunCancelRequested,
    "run.redrive_requested": RunRedriveRequested,
    "run.fork_requested": RunForkRequested,
    "run.fork_accepted": RunForkAccepted,
    "limit.granted": LimitGranted,
}


def run_id_for(topic: str, partition: int, offset: int) -> str:
    """A trigger without a run_id gets one derived from its position, so a redelivered trigger gets the same."""
    return str(uuid.uuid5(_RUN_ID_NAMESPACE, f"{topic}:{partition}:{offset}"))


class Inbox:
    """Decodes the records of the coordinator's input topics."""

    def __init__(self, topics: Topics, partitions: int):
        self.topics = topics
        self.partitions = partitions

    def decode(self, topic: str, value: bytes | None) -> Any:
        """The event of a completions, signals or coordinator record; raises DecodeError."""
        if topic == self.topics.completions:
            raw = codec.decode_object(value)
            return codec.validate(_COMPLETIONS_RECORDS.get(raw.get("type"), ActivityCompleted), raw)  # type: ignore[arg-type]
        if topic == self.topics.signals:
            return codec.decode(SignalSent, value)
        raw = codec.decode_object(value)
        model = _COORDINATOR_RECORDS.get(raw.get("type"))  # type: ignore[arg-type]
        if model is None:
            raise DecodeError(f"unknown record type {raw.get('type')!r}")
        return codec.validate(model, raw)

    def what(self, topic: str) -> str:
        """How a dead letter names a record of ``topic`` it could not decode."""
        return {self.topics.completions: "completion", self.topics.signals: "signal"}.get(topic, "coordinator record")

    def accept_trigger(self, msg: Any) -> RunAccepted | Send:
        """Validate a trigger; raises DecodeError. A trigger that carries its run_id and sits on that run's partition
        (``LegatoClient`` and any producer keying by run_id with Kafka's default partitioner) is the run's to decide
        now: its ``RunAccepted`` is returned. Any other is re-keyed by run_id onto the coordinator topic (a record to
        send), whose partition owns the run: one transaction more before the run starts."""
        trigger = codec.decode(RunRequested, msg.value)
        run_id = trigger.run_id or run_id_for(msg.topic, msg.partition, msg.offset)
        accepted = RunAccepted(run_id=run_id, workflow=trigger.workflow, input=trigger.input, correlation_id=trigger.correlation_id, parent=trigger.parent,
                               version=trigger.version, priority=trigger.priority, triggered_ms=msg.timestamp if msg.timestamp > 0 else None)
        if trigger.run_id and msg.partition == partition_for(run_id.encode(), self.partitions):
            return accepted
        return (self.topics.coordinator, run_id.encode(), codec.dumps(accepted), None)

    def misplaced(self, msg: Any, run_id: str) -> Send | None:
        """The same record keyed onto its run's partition when a producer put it elsewhere (not keyed by run_id,
        or another partitioner), so that the run's state is never split; None when it is where it belongs."""
        key = run_id.encode()
        if msg.partition == partition_for(key, self.partitions):
            return None
        return (msg.topic, key, msg.value, None)

    def dead_letter(self, msg: Any, reason: str) -> Send:
        key, value = dead_letter(msg.topic, msg.partition, msg.offset, msg.key, msg.value, reason)
        return (self.topics.dlq, key, value, None)
