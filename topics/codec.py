"""One orjson codec for every record on the wire."""
from __future__ import annotations

import base64
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

MAX_MESSAGE_BYTES = 1024 * 1024


class DecodeError(ValueError):
    """A message that cannot be turned into a record; the reason says where and why."""


def dumps(value: Any) -> bytes:
    """``value`` as JSON bytes of their exact size. orjson's own result keeps the buffer it wrote into (4 KiB of
    memory for a 100-byte record with orjson 3.12 and 3.13, 1 KiB with 3.10 and 3.11), and records wait in batches and
    producer queues by the tens of thousands during a burst: the copy costs 0.2 µs (BENCHMARKS.md, memory)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    return bytes(memoryview(orjson.dumps(value)))


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def decode(model: type[M], data: bytes | None) -> M:
    """Decode ``data`` into ``model`` or raise DecodeError with a readable reason."""
    return validate(model, decode_object(data))


def decode_object(data: bytes | None) -> dict[str, Any]:
    """Parse ``data`` as one JSON object within the size limit, or raise DecodeError."""
    if data is None:
        raise DecodeError("empty message (no value)")
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(data)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise DecodeError(f"expected a JSON object, got {type(raw).__name__}")
    return raw


def validate(model: type[M], raw: dict[str, Any]) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise DecodeError(f"invalid {model.__name__}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def payload_text(data: bytes | None) -> str:
    """The original bytes as text when valid UTF-8, else base64 (for dead letters)."""
    if data is None:
        return ""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(data).decode("ascii")
