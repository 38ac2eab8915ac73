"""What expressions see of values stored by reference (claim checks, docs/payloads.md).

A run's document keeps references (``{"$ref": "legato-payload:…", …}``); CEL expressions, conditions, loops and
joins must see the values. The machine does no I/O, so the shell fetches the values a decision may need before it
decides (``streams/coordinator/payloads.py``) and hands the machine a lookup: ``lookup(payload_id)`` is a
:class:`Fetched` value, a :class:`Unreadable` one (deleted, corrupted: the expression fails), or None when the shell
did not fetch it (:class:`PayloadsMissing`: the shell fetches it and decides again). From the machine's point of view
the lookup is a pure function of the payload id: a payload never changes (its id holds its sha256).

An expression's result goes back to references: any part of it equal to a value it read by reference (same
canonical JSON) is that reference again, so ``input: "${ steps.a.output }"`` sends the next step the reference
(its worker resolves it) and the run document never holds the value.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import orjson

from legato.topics.payload_refs import PayloadRef, is_ref


@dataclass(frozen=True)
class Fetched:
    """A payload's value, with the canonical digest of its JSON (``canonical_digest``) and its size."""

    value: Any
    digest: str
    size: int


@dataclass(frozen=True)
class Unreadable:
    """A payload the shell could not read (deleted by retention, corrupted): why."""

    reason: str


Lookup = Callable[[str], "Fetched | Unreadable | None"]


class PayloadsMissing(Exception):
    """The decision needs payloads the shell has not fetched: it fetches them and decides the record again."""

    def __init__(self, refs: list[dict[str, Any]]):
        super().__init__(f"{len(refs)} payload(s) not fetched: " + ", ".join(r["$ref"] for r in refs[:3]))
        self.refs = refs


class PayloadUnreadable(ValueError):
    """A reference an expression reads whose payload cannot be read (an ``ExpressionError`` where it is evaluated)."""


class Claims:
    """Resolves the references an expression reads and turns its result back into references, for one decision: it
    remembers the containers it found without references (a 10,000-item ``input`` read by every item of a map is
    walked once per decision, not once per expression)."""

    def __init__(self, lookup: Lookup):
        self.lookup = lookup
        self._plain: dict[int, Any] = {}  # id → the container itself (kept alive, so its id stays its own)

    def resolve(self, variables: dict[str, Any], steps_read: set[str] | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """``variables`` with the references they hold replaced by values (in ``steps``, only the entries of the
        step ids in ``steps_read``, or all when None), and the references read, by the digest of their value."""
        seen: dict[str, dict[str, Any]] = {}
        missing: dict[str, dict[str, Any]] = {}
        out = {}
        for name, value in variables.items():
            if name == "steps" and steps_read is not None and isinstance(value, dict):
                read = {k: self._values(v, seen, missing) for k, v in value.items() if k in steps_read}
                out[name] = {**value, **read} if read else value
            elif isinstance(value, (dict, list)) and id(value) in self._plain:
                out[name] = value  # read before in this decision: no reference in it (``input`` does not change)
            else:
                before = len(missing)
                out[name] = self._values(value, seen, missing)
                if out[name] is value and len(missing) == before and isinstance(value, (dict, list)):
                    self._plain[id(value)] = value
        if missing:
            raise PayloadsMissing(list(missing.values()))
        return out, seen

    def _values(self, value: Any, seen: dict[str, dict[str, Any]], missing: dict[str, dict[str, Any]]) -> Any:
        if isinstance(value, dict):
            if is_ref(value):
                ref = PayloadRef.model_validate(value)
                found = self.lookup(ref.id)
                if found is None:
                    missing[ref.id] = value
                    return value
                if isinstance(found, Unreadable):
                    raise PayloadUnreadable(f"payload {ref.id}: {found.reason}")
                seen.setdefault(found.digest, value)
                return self._values(found.value, seen, missing)  # a stored value may hold references itself
            out, changed = {}, False
            for k, v in value.items():
                nv = self._values(v, seen, missing)
                changed = changed or nv is not v
                out[k] = nv
            return out if changed else value
        if isinstance(value, list):
            items = [self._values(v, seen, missing) for v in value]
            return items if any(a is not b for a, b in zip(items, value)) else value
        return value


def rereference(value: Any, seen: dict[str, dict[str, Any]]) -> Any:
    """``value`` with every part equal to a value read by reference (``seen``: the reference by the canonical digest
    of its value) put back as that reference. Parts shorter than the smallest value read are not hashed."""
    if not seen:
        return value
    return _rereference(value, seen, min(ref["size"] for ref in seen.values()))


def _rereference(value: Any, seen: dict[str, dict[str, Any]], smallest: int) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)  # the length of the JSON the reference's size counts
    if len(data) < smallest:
        return value
    ref = seen.get(hashlib.sha256(data).hexdigest())
    if ref is not None:
        return ref
    if isinstance(value, dict):
        return {k: _rereference(v, seen, smallest) for k, v in value.items()}
    if isinstance(value, list):
        return [_rereference(v, seen, smallest) for v in value]
    return value
