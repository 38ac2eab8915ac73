"""The JSON Schema of a workflow file, generated from the models in ``workflows/model.py``.

Editors that read JSON Schema (VS Code's YAML extension, JetBrains IDEs) validate a workflow file as one types
it when it points at the schema (``# yaml-language-server: $schema=<path>/workflow.json``). The published copy is
``topics/schemas/workflow.json``, written by ``python -m legato.tools.docs_gen``; ``legato schema workflow``
prints the same text. The schema checks the shape of a file; the loader still refuses what only compiling can
find (unknown step ids in expressions, CEL syntax, nesting depth).
"""
from __future__ import annotations

import json

from legato.workflows.model import Workflow

SCHEMA_ID = "legato/workflow.json"


def workflow_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a workflow YAML document."""
    schema = Workflow.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
        "title": "Legato workflow",
        "description": "A Legato workflow definition (YAML). Reference: docs/language/reference.md.",
    }


def render_workflow_schema() -> str:
    """The schema as the text of ``topics/schemas/workflow.json``."""
    return json.dumps(workflow_schema(), indent=2, sort_keys=True) + "\n"
