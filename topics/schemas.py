"""JSON Schemas of every record on the public topics (``started.json`` and ``heartbeat.json``: the records a worker
may send to ``legato.completions`` beside its completions, ActivityStarted and ActivityHeartbeat), and of the records a user may produce to the internal
coordinator topic (``cancel.json``: RunCancelRequested, ``redrive.json``: RunRedriveRequested, ``fork.json``:
RunForkRequested) and of the fork's seed the coordinator writes there (``fork_accepted.json``: RunForkAccepted), and of a payload reference (``payload_ref.json``: a value stored
by reference, ``legato.topics.payloads``), generated from the models.

``python -m legato.topics.schemas`` rewrites topics/schemas/*.json; a test fails when they are stale.
"""
from __future__ import annotations

import json
from pathlib import Path

from legato.topics.models import (
    ActivityCompleted,
    ActivityHeartbeat,
    ActivityRequested,
    ActivityStarted,
    CachedResult,
    DeadLetter,
    DefinitionDeployed,
    ProgressReported,
    RunCancelRequested,
    RunEvent,
    RunForkAccepted,
    RunForkRequested,
    RunRedriveRequested,
    RunRequested,
    SignalSent,
)
from legato.topics.payloads import PayloadRef

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"

RECORDS = {
    "triggers": RunRequested,
    "requests": ActivityRequested,
    "completions": ActivityCompleted,
    "started": ActivityStarted,
    "heartbeat": ActivityHeartbeat,
    "runs": RunEvent,
    "dlq": DeadLetter,
    "cancel": RunCancelRequested,
    "signals": SignalSent,
    "progress": ProgressReported,
    "definitions": DefinitionDeployed,
    "redrive": RunRedriveRequested,
    "fork": RunForkRequested,
    "fork_accepted": RunForkAccepted,
    "cache": CachedResult,
    "payload_ref": PayloadRef,
}


def render() -> dict[str, str]:
    """File name -> schema text for every record in RECORDS."""
    out = {}
    for topic, model in RECORDS.items():
        schema = model.model_json_schema(mode="validation")
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"legato/{topic}.json", **schema}
        out[f"{topic}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write() -> list[Path]:
    SCHEMA_DIR.mkdir(exist_ok=True)
    written = []
    for name, text in render().items():
        path = SCHEMA_DIR / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write():
        print(p)
