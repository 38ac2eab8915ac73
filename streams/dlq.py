"""Dead-lettering: whatever cannot be processed goes to legato.dlq with the reason, never lost."""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import faust

from legato.topics import codec
from legato.topics.models import DeadLetter

log = logging.getLogger("legato.dlq")

MAX_PAYLOAD_CHARS = 128 * 1024
"""Dead letters carry at most this much of the original payload (its size and sha256 are in the reason)."""

MAX_LETTER_BYTES = 900_000
"""An encoded dead letter stays under the broker's default 1 MiB message limit."""


class DeadLetters:
    def __init__(self, app: faust.App, topic_name: str, metrics: Any = None):
        self.topic = app.topic(topic_name, key_serializer="raw", value_serializer="raw")
        self.metrics = metrics
        self.count = 0

    async def send(self, message: Any, reason: str) -> None:
        """Dead-letter a consumed faust message with ``reason``; never raises."""
        key, data = dead_letter(message.topic, message.partition, message.offset, message.key, message.value, reason)
        try:
            await self.topic.send(key=key, value=data)
        except Exception:
            log.exception("cannot write the dead letter of %s:%s@%s", message.topic, message.partition, message.offset)
        self.count += 1
        if self.metrics is not None:
            self.metrics.dead_letter(message.topic, reason)


def dead_letter(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, reason: str) -> tuple[bytes | None, bytes]:
    """The dead letter of a consumed record: its key (cut to 1000 bytes) and the encoded DeadLetter.

    The payload is cut to MAX_PAYLOAD_CHARS: a message near the size limit grows when written as JSON text or base64,
    and a dead letter the broker refuses would stop the consumer that was only trying to set it aside.
    """
    payload = codec.payload_text(value)
    if len(payload) > MAX_PAYLOAD_CHARS:
        digest = hashlib.sha256(value or b"").hexdigest()
        reason = f"{reason} [payload of {len(value or b'')} bytes cut to {MAX_PAYLOAD_CHARS} characters; sha256 {digest}]"
        payload = payload[:MAX_PAYLOAD_CHARS]
    letter = DeadLetter(
        source_topic=topic,
        partition=partition,
        offset=offset,
        reason=reason[:2000],
        payload=payload,
        key=codec.payload_text(key)[:1000] if key is not None else None,
    )
    data = codec.dumps(letter)
    while len(data) > MAX_LETTER_BYTES and letter.payload:  # escaped control characters grow 6x in JSON
        letter = letter.model_copy(update={"payload": letter.payload[: len(letter.payload) // 2]})
        data = codec.dumps(letter)
    log.warning("dead letter from %s:%s@%s: %s", topic, partition, offset, reason[:500])
    return (key[:1000] if key else key), data
