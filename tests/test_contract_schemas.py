"""The published JSON Schemas match the models, and real records validate against them."""
import json

import jsonschema
import pytest

from legato.topics import codec
from legato.topics.models import ActivityCompleted, RunEvent
from legato.topics.schemas import SCHEMA_DIR, render


def test_schema_files_are_current():
    for name, text in render().items():
        path = SCHEMA_DIR / name
        assert path.exists(), f"{path} missing: run python -m legato.topics.schemas"
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run python -m legato.topics.schemas"


def _schema(name):
    return json.loads((SCHEMA_DIR / name).read_text())


def test_completion_examples_validate():
    schema = _schema("completions.json")
    good = {"request_id": "r/a/1", "run_id": "r", "step_id": "a", "attempt": 1, "status": "succeeded", "output": {"x": 1}, "confidence": 0.5}
    jsonschema.validate(good, schema)
    ActivityCompleted.model_validate(good)
    for bad in ({**good, "status": "done"}, {**good, "confidence": 1.5}, {k: v for k, v in good.items() if k != "run_id"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(codec.DecodeError):
            codec.decode(ActivityCompleted, json.dumps(bad).encode())


def test_run_event_encodes_to_schema():
    event = RunEvent(type="run.completed", run_id="r", workflow="w", status="succeeded", output=[1], started_at="2026-01-01T00:00:00Z")
    jsonschema.validate(json.loads(codec.dumps(event)), _schema("runs.json"))


def test_trigger_schema_requires_workflow():
    schema = _schema("triggers.json")
    jsonschema.validate({"workflow": "w", "input": {}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"input": {}}, schema)
