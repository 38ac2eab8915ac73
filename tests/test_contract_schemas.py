"""The published JSON Schemas match the models, and real records validate against them."""
import json

import jsonschema
import pytest

from legato.topics import codec
from legato.topics.models import ActivityCompleted, ActivityHeartbeat, ActivityStarted, DefinitionDeployed, ForkedStep, RunEvent, RunForkAccepted, RunForkRequested, RunRedriveRequested
from legato.topics.schemas import RECORDS, SCHEMA_DIR, render


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


# --- issue 11: the lifecycle records and fields -------------------------------------------------------


def test_a_definition_record_matches_its_schema():
    record = DefinitionDeployed(name="w", version=2, sha256="a" * 64, source="name: w\n", deployed_at="2026-01-01T00:00:00Z")
    raw = json.loads(codec.dumps(record))
    assert set(raw) == {"name", "version", "sha256", "source", "deployed_at"}
    jsonschema.validate(raw, _schema("definitions.json"))
    for field in raw:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({k: v for k, v in raw.items() if k != field}, _schema("definitions.json"))


def test_run_events_carry_version_redrives_and_forked_from_in_the_schema():
    schema = _schema("runs.json")
    redriven = RunEvent(type="run.redriven", run_id="r", workflow="w", status="running", started_at="2026-01-01T00:00:00Z", version=2, redrives=1,
                        forked_from={"run_id": "src", "step": "two"})
    raw = json.loads(codec.dumps(redriven))
    assert (raw["version"], raw["redrives"], raw["forked_from"]) == (2, 1, {"run_id": "src", "step": "two"})
    jsonschema.validate(raw, schema)
    for bad in ({**raw, "forked_from": {"run_id": "src"}}, {**raw, "forked_from": {"step": "two"}}, {**raw, "redrives": "one"}, {**raw, "version": 1.5}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(codec.DecodeError):
            codec.decode(RunEvent, json.dumps(bad).encode())


def test_every_new_coordinator_record_has_a_schema():
    """The records issue 11 adds to ``legato.coordinator``: redrive and fork requests, and the fork's seed."""
    assert {"redrive": RunRedriveRequested, "fork": RunForkRequested, "fork_accepted": RunForkAccepted}.items() <= RECORDS.items()
    seed = RunForkAccepted(run_id="new", workflow="w", version=2, sha256="a" * 64, input={"x": 1}, forked_from={"run_id": "src", "step": "b"},
                           steps=[ForkedStep(step_id="a", status="succeeded", output={"y": 2}, cost={"usd": 0.01}, path="case0")])
    raw = json.loads(codec.dumps(seed))
    assert raw["type"] == "run.fork_accepted"
    jsonschema.validate(raw, _schema("fork_accepted.json"))
    for bad in ({k: v for k, v in raw.items() if k != "sha256"}, {**raw, "forked_from": {"run_id": "src"}}, {**raw, "steps": [{"step_id": "a", "status": "running"}]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, _schema("fork_accepted.json"))


# --- the handler's start and heartbeats on legato.completions --------------------------------------------


@pytest.mark.parametrize("name,model,record", [
    ("started.json", ActivityStarted, {"type": "activity.started", "request_id": "r/a/1", "run_id": "r", "step_id": "a", "attempt": 1, "started_ms": 5}),
    ("heartbeat.json", ActivityHeartbeat, {"type": "activity.heartbeat", "request_id": "r/a/1", "run_id": "r", "step_id": "a", "attempt": 1,
                                           "heartbeat_ms": 6}),
])
def test_started_and_heartbeat_records_match_their_schemas(name, model, record):
    schema = _schema(name)
    jsonschema.validate(record, schema)
    assert json.loads(codec.dumps(model.model_validate(record))) == record
    for field in ("type", "request_id", "run_id", "attempt", "started_ms" if "started_ms" in record else "heartbeat_ms"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({k: v for k, v in record.items() if k != field}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**record, "type": "activity.completed"}, schema)


def test_requests_carry_what_the_worker_reports():
    schema = _schema("requests.json")
    request = {"request_id": "r/a/1", "run_id": "r", "step_id": "a", "activity": "x", "attempt": 1, "report_started": True, "heartbeat_ms": 30000}
    jsonschema.validate(request, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**request, "heartbeat_ms": 0}, schema)
