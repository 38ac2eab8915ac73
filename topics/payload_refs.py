"""The reference form of claim checks, and what can be done with references without reading a store (pure: the
state machine imports it). The stores and the rest are in ``legato.topics.payloads``."""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import orjson
from pydantic import BaseModel, ConfigDict, Field

REF_PREFIX = "legato-payload:"


class PayloadRef(BaseModel):
    """A reference to a stored payload, as it travels in place of the value."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True,
                              json_schema_extra={"description": "A value stored by reference (a claim check): fetch it from the payload store by its id."})

    ref: str = Field(alias="$ref", pattern=r"^legato-payload:.+", description="legato-payload:<payload id>")
    size: int = Field(ge=0, description="bytes of the value's JSON")
    sha256: str = Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$", description="sha256 of the value's JSON, checked on read")
    chunks: int | None = Field(default=None, ge=1, description="Kafka store: records the JSON is cut into")
    partition: int | None = Field(default=None, ge=0, description="Kafka store: the partition of every chunk")
    offset: int | None = Field(default=None, ge=0, description="Kafka store: the offset of the first chunk")

    @property
    def id(self) -> str:
        return self.ref[len(REF_PREFIX):]

    def wire(self) -> dict[str, Any]:
        """The reference as it travels (the JSON object in place of the value)."""
        return self.model_dump(by_alias=True, exclude_none=True)


def is_ref(value: Any) -> bool:
    """True when ``value`` is a payload reference (a dict whose ``$ref`` starts ``legato-payload:``)."""
    return isinstance(value, dict) and isinstance(value.get("$ref"), str) and value["$ref"].startswith(REF_PREFIX)


def refs_in(value: Any) -> list[PayloadRef]:
    """Every payload reference inside ``value`` (depth first, each once)."""
    found: dict[str, PayloadRef] = {}
    _walk(value, found)
    return list(found.values())


def _walk(value: Any, found: dict[str, PayloadRef]) -> None:
    if isinstance(value, dict):
        if is_ref(value):
            ref = PayloadRef.model_validate(value)
            found.setdefault(ref.id, ref)
            return
        for v in value.values():
            _walk(v, found)
    elif isinstance(value, list):
        for v in value:
            _walk(v, found)


def may_hold_refs(data: bytes) -> bool:
    """A quick test on a record's bytes: False means no reference is inside."""
    return REF_PREFIX.encode() in data


def substitute(value: Any, values: dict[str, Any] | Callable[[PayloadRef], Any]) -> Any:
    """``value`` with each reference replaced by ``values[id]`` (or ``values(ref)``); containers without references
    are returned as they are, not copied."""
    if isinstance(value, dict):
        if is_ref(value):
            ref = PayloadRef.model_validate(value)
            return values(ref) if callable(values) else values[ref.id]
        out, changed = {}, False
        for k, v in value.items():
            nv = substitute(v, values)
            changed = changed or nv is not v
            out[k] = nv
        return out if changed else value
    if isinstance(value, list):
        items = [substitute(v, values) for v in value]
        return items if any(a is not b for a, b in zip(items, value)) else value
    return value


def canonical_digest(value: Any) -> str:
    """sha256 of ``value``'s JSON with sorted keys: the same for a value and its copy that went through CEL (whose
    maps may come back in another key order)."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()
