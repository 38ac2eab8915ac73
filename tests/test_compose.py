"""docker-compose.yml must be valid per the Compose Specification.

There is no Docker in CI, so instead of `docker compose config` the file is
checked against the official JSON schema, vendored from
compose-spec/compose-spec (schema/compose-spec.json) in tests/schemas/.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "compose-spec.json"
COMPOSE_PATH = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_PATH.read_text())


def _errors(validator, doc) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


def test_schema_is_draft7(validator):
    assert isinstance(validator, jsonschema.Draft7Validator)


def test_compose_file_is_valid(validator, compose):
    assert _errors(validator, compose) == []


def test_compose_services(compose):
    services = compose["services"]
    assert set(services) >= {"kafka", "coordinator", "worker"}
    assert services["kafka"]["image"] == "apache/kafka:3.9.1"
    assert "healthcheck" in services["kafka"]
    for name in ("coordinator", "worker"):
        svc = services[name]
        assert svc["environment"]["LEGATO_BOOTSTRAP"] == "kafka:19092"
        assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "kafka:19092" in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["coordinator"]["command"].startswith("legato coordinator")


def test_invalid_service_key_is_rejected(validator, compose):
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["replicaz"] = 2  # typo'd key
    errors = _errors(validator, broken)
    assert errors, "schema accepted an unknown service key"


def test_invalid_depends_on_condition_is_rejected(validator, compose):
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["depends_on"]["kafka"]["condition"] = "healthy"
    assert _errors(validator, broken)
