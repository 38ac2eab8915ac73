"""The key of the result cache (``legato.cache``): every writer and reader of the topic computes it the same way."""
from __future__ import annotations

import hashlib
from typing import Any

import orjson


def fingerprint(activity: str, payload: Any) -> str:
    """sha256 (hex) of the activity name, a NUL byte and the canonical JSON of the input (keys sorted)."""
    canonical = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(activity.encode() + b"\0" + canonical).hexdigest()
