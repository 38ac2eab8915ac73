"""The redrive and fork records (issue 11): their schemas, and the CLI's refusal of a bad --input."""
from __future__ import annotations

import json

import jsonschema
import pytest

from legato.streams.cli import main
from legato.topics import codec
from legato.topics.models import ForkedStep, RunForkAccepted, RunForkRequested, RunRedriveRequested
from legato.topics.schemas import SCHEMA_DIR


def _schema(name):
    return json.loads((SCHEMA_DIR / name).read_text())


def test_redrive_request_round_trips_and_matches_its_schema():
    record = RunRedriveRequested(run_id="r1", reason="worker fixed")
    raw = json.loads(codec.dumps(record))
    assert raw == {"type": "run.redrive_requested", "run_id": "r1", "reason": "worker fixed"}
    jsonschema.validate(raw, _schema("redrive.json"))
    assert codec.decode(RunRedriveRequested, codec.dumps(record)) == record
    with pytest.raises(codec.DecodeError):
        codec.decode(RunRedriveRequested, b'{"type": "run.redrive_requested", "run_id": ""}')


def test_fork_request_round_trips_and_matches_its_schema():
    record = RunForkRequested(run_id="src", from_step="draft", new_run_id="new", input={"prompt": "shorter"})
    raw = json.loads(codec.dumps(record))
    jsonschema.validate(raw, _schema("fork.json"))
    assert codec.decode(RunForkRequested, codec.dumps(record)) == record
    missing = {k: v for k, v in raw.items() if k != "new_run_id"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(missing, _schema("fork.json"))


def test_fork_seed_carries_the_pin_and_the_copied_steps():
    seed = RunForkAccepted(
        run_id="new", workflow="w", version=2, sha256="a" * 64, input={"x": 1}, forked_from={"run_id": "src", "step": "b"},
        steps=[ForkedStep(step_id="a", status="succeeded", output={"y": 2}, cost={"usd": 0.01})],
    )
    assert codec.decode(RunForkAccepted, codec.dumps(seed)) == seed


@pytest.mark.parametrize("bad, message", [("{", "--input is not valid JSON"), ("[1]", "--input must be a JSON object")])
def test_fork_refuses_a_bad_input_before_connecting(capsys, bad, message):
    assert main(["fork", "r1", "--from", "b", "--input", bad]) == 2
    assert message in capsys.readouterr().err
