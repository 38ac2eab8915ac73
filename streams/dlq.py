"""Dead-lettering: whatever cannot be processed goes to legato.dlq with the reason, never lost."""
from __future__ import annotations

import logging
from typing import Any

import faust

from topics import codec
from topics.models import DeadLetter

log = logging.getLogger("legato.dlq")


class DeadLetters:
    def __init__(self, app: faust.App, topic_name: str, metrics: Any = None):
        self.topic = app.topic(topic_name, key_serializer="raw", value_serializer="raw")
        self.metrics = metrics
        self.count = 0

    async def send(self, message: Any, reason: str) -> None:
        """Dead-letter a consumed faust message with ``reason``."""
        key = message.key
        letter = DeadLetter(
            source_topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            reason=reason,
            payload=codec.payload_text(message.value),
            key=codec.payload_text(key) if key is not None else None,
        )
        log.warning("dead letter from %s:%s@%s: %s", message.topic, message.partition, message.offset, reason)
        await self.topic.send(key=key, value=codec.dumps(letter))
        self.count += 1
        if self.metrics is not None:
            self.metrics.dead_letter(message.topic, reason)
