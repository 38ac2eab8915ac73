"""Handlers served only by the worker test_output_size.py starts with ``LEGATO_PAYLOAD_STORE=none`` (the session's
worker does not load this module, so it never takes their requests)."""
from __future__ import annotations

from typing import Any

from legato.handlers.registry import activity


@activity("e2e_huge_inline")
async def e2e_huge_inline(data: dict[str, Any]) -> dict[str, Any]:
    """Return a text of ``bytes`` characters: with no payload store, an output past a Kafka record's limit."""
    return {"text": "x" * int(data["bytes"])}
