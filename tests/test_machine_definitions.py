"""Definitions that are refused whole, each with the file, the path inside it and the reason."""
from __future__ import annotations

import textwrap

import pytest
import yaml

from tests.machine_helpers import EXAMPLES, compile_yaml, example
from legato.workflows.model import ENGINE_MAX_ITERATIONS, DefinitionError, compile_workflow, load_directories, load_workflow

# (name, yaml, path, a fragment of the reason)
REFUSED = [
    (
        "duplicate ids",
        """
        name: w
        steps:
          - {id: a, activity: x}
          - {id: a, activity: y}
        """,
        "steps[1].id",
        "duplicate step id 'a' (first at steps[0])",
    ),
    (
        "duplicate ids across nesting",
        """
        name: w
        steps:
          - {id: a, activity: x}
          - id: p
            parallel: {branches: {b: [{id: a, activity: y}]}}
        """,
        "steps[1].parallel.branches.b[0].id",
        "duplicate step id 'a'",
    ),
    (
        "duplicate ids inside a loop body and a choice",
        """
        name: w
        steps:
          - id: l
            loop:
              max_iterations: 2
              steps:
                - id: c
                  choice:
                    cases: [{when: "true", steps: [{id: l, activity: x}]}]
                    default: [{id: d, activity: x}]
        """,
        "steps[0].loop.steps[0].choice.cases[0].steps[0].id",
        "duplicate step id 'l'",
    ),
    (
        "choice without default",
        """
        name: w
        steps:
          - id: c
            choice: {cases: [{when: "true", steps: [{id: a, activity: x}]}]}
        """,
        "steps[0].choice.default",
        "Field required",
    ),
    (
        "choice with cases and route",
        """
        name: w
        steps:
          - id: c
            choice:
              route: input.k
              routes: {r: [{id: a, activity: x}]}
              cases: [{when: "true", steps: [{id: b, activity: x}]}]
              default: [{id: d, activity: x}]
        """,
        "steps[0].choice",
        "either `cases` or `route`",
    ),
    (
        "route without routes",
        """
        name: w
        steps:
          - id: c
            choice: {route: input.k, default: [{id: d, activity: x}]}
        """,
        "steps[0].choice",
        "`route` needs `routes`",
    ),
    (
        "loop above the engine cap",
        f"""
        name: w
        steps:
          - id: l
            loop: {{max_iterations: {ENGINE_MAX_ITERATIONS + 1}, steps: [{{id: a, activity: x}}]}}
        """,
        "steps[0].loop.max_iterations",
        f"{ENGINE_MAX_ITERATIONS + 1} is above the engine cap of {ENGINE_MAX_ITERATIONS}",
    ),
    (
        "loop of zero iterations",
        """
        name: w
        steps:
          - id: l
            loop: {max_iterations: 0, steps: [{id: a, activity: x}]}
        """,
        "steps[0].loop.max_iterations",
        "greater than or equal to 1",
    ),
    (
        "unknown step in until",
        """
        name: w
        steps:
          - id: l
            loop: {max_iterations: 3, until: "steps.nope.output > 1", steps: [{id: a, activity: x}]}
        """,
        "steps[0].loop.until",
        "refers to unknown step 'nope'",
    ),
    (
        "unknown step in an input template",
        """
        name: w
        steps:
          - {id: a, activity: x, input: {v: "${ steps.ghost.output }"}}
        """,
        "steps[0].input",
        "refers to unknown step 'ghost'",
    ),
    (
        "unknown step in a case",
        """
        name: w
        steps:
          - id: c
            choice:
              cases: [{when: "steps.a.output == 1 && steps.zz.output == 2", steps: [{id: a, activity: x}]}]
              default: [{id: d, activity: x}]
        """,
        "steps[0].choice.cases[0].when",
        "refers to unknown step 'zz'",
    ),
    (
        "unknown step in the workflow output",
        """
        name: w
        output: "steps.ghost.output"
        steps:
          - {id: a, activity: x}
        """,
        "output",
        "refers to unknown step 'ghost'",
    ),
    (
        "bad CEL in a case",
        """
        name: w
        steps:
          - id: c
            choice:
              cases: [{when: "1 +", steps: [{id: a, activity: x}]}]
              default: [{id: d, activity: x}]
        """,
        "steps[0].choice.cases[0].when",
        "does not compile",
    ),
    (
        "bad CEL in a template",
        """
        name: w
        steps:
          - {id: a, activity: x, input: {v: "${ (( }"}}
        """,
        "steps[0].input",
        "does not compile",
    ),
    (
        "bad CEL in a fail reason",
        """
        name: w
        steps:
          - {id: f, fail: {reason: "(("}}
        """,
        "steps[0].fail.reason",
        "does not compile",
    ),
    (
        "bad CEL in a route",
        """
        name: w
        steps:
          - id: c
            choice: {route: "a b", routes: {r: [{id: a, activity: x}]}, default: [{id: d, activity: x}]}
        """,
        "steps[0].choice.route",
        "does not compile",
    ),
    (
        "unknown key on a step",
        """
        name: w
        steps:
          - {id: a, activity: x, retries: 3}
        """,
        "steps[0].retries",
        "Extra inputs are not permitted",
    ),
    (
        "unknown key at the top",
        """
        name: w
        stepz: []
        steps:
          - {id: a, activity: x}
        """,
        "stepz",
        "Extra inputs are not permitted",
    ),
    (
        "unknown key deep inside",
        """
        name: w
        steps:
          - id: p
            parallel: {branches: {b: [{id: a, activity: x, retry: {max_attempts: 2, jiggle: true}}]}}
        """,
        "steps[0].parallel.branches.b[0].retry.jiggle",
        "Extra inputs are not permitted",
    ),
    (
        "bad step duration",
        """
        name: w
        steps:
          - {id: a, activity: x, timeout: 5 sec}
        """,
        "steps[0].timeout",
        "not a duration: '5 sec'",
    ),
    (
        "negative backoff",
        """
        name: w
        steps:
          - {id: a, activity: x, retry: {backoff: -1}}
        """,
        "steps[0].retry.backoff",
        "negative duration",
    ),
    (
        "bad run timeout",
        """
        name: w
        timeout: soon
        steps:
          - {id: a, activity: x}
        """,
        "timeout",
        "not a duration: 'soon'",
    ),
    (
        "bad loop timeout",
        """
        name: w
        steps:
          - id: l
            loop: {max_iterations: 2, timeout: 3 days, steps: [{id: a, activity: x}]}
        """,
        "steps[0].loop.timeout",
        "not a duration",
    ),
    (
        "a step with two kinds",
        """
        name: w
        steps:
          - {id: a, activity: x, loop: {max_iterations: 2, steps: [{id: b, activity: y}]}}
        """,
        "steps[0]",
        "exactly one of: activity, parallel, map, choice, loop, workflow, end, fail",
    ),
    (
        "a step with no kind",
        """
        name: w
        steps:
          - {id: a, input: {}}
        """,
        "steps[0]",
        "exactly one of",
    ),
    (
        "a bad step id",
        """
        name: w
        steps:
          - {id: 1a, activity: x}
        """,
        "steps[0].id",
        "should match pattern",
    ),
    (
        "no steps",
        """
        name: w
        steps: []
        """,
        "steps",
        "at least 1 item",
    ),
    (
        "an empty branch",
        """
        name: w
        steps:
          - id: p
            parallel: {branches: {b: []}}
        """,
        "steps[0].parallel.branches.b",
        "at least 1 item",
    ),
    (
        "not a mapping",
        """
        - id: a
        """,
        "",
        "a workflow is a mapping, got list",
    ),
]


@pytest.mark.parametrize("name,text,path,reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_bad_definition_is_refused_with_file_path_and_reason(name, text, path, reason):
    doc = yaml.safe_load(textwrap.dedent(text))
    with pytest.raises(DefinitionError) as caught:
        compile_workflow(doc, "flows/bad.yaml")
    err = caught.value
    assert err.file == "flows/bad.yaml"
    assert err.path == path
    assert reason in err.reason
    assert str(err) == f"flows/bad.yaml: {path or '<document>'}: {err.reason}"


def test_the_engine_cap_itself_is_allowed():
    wf = compile_yaml(
        f"""
        name: w
        steps:
          - id: l
            loop: {{max_iterations: {ENGINE_MAX_ITERATIONS}, steps: [{{id: a, activity: x}}]}}
        """
    )
    assert wf.steps["l"].loop.max_iterations == ENGINE_MAX_ITERATIONS


def test_every_expression_is_compiled_and_every_sequence_indexed():
    wf = example("support_triage")
    assert set(wf.sequences) == {"root", "enrich/customer", "enrich/history", "route/case0", "route/default", "draft/body"}
    assert set(wf.expressions) == {"route.when.0", "draft.until", "output"}
    assert wf.activities == {"classify_ticket", "lookup_customer", "lookup_history", "answer_billing", "write_reply"}
    assert wf.steps["classify"].retry.backoff == 0.1 and wf.steps["classify"].timeout == 5.0


def test_load_workflow_names_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: w\nsteps:\n  - {id: a, activity: x, timeout: forever}\n")
    with pytest.raises(DefinitionError) as caught:
        load_workflow(bad)
    assert caught.value.file == str(bad) and caught.value.path == "steps[0].timeout"

    not_yaml = tmp_path / "junk.yaml"
    not_yaml.write_text("name: [unclosed\n")
    with pytest.raises(DefinitionError) as caught:
        load_workflow(not_yaml)
    assert caught.value.file == str(not_yaml) and "not valid YAML" in caught.value.reason


def test_one_bad_file_refuses_the_whole_directory(tmp_path):
    (tmp_path / "a.yaml").write_text((EXAMPLES / "support_triage.yaml").read_text())
    (tmp_path / "b.yaml").write_text("name: other\nsteps:\n  - {id: x, activity: y, bogus: 1}\n")
    with pytest.raises(DefinitionError) as caught:
        load_directories([tmp_path])
    assert caught.value.file.endswith("b.yaml") and caught.value.path == "steps[0].bogus"


def test_the_shipped_examples_all_load():
    found = load_directories([EXAMPLES])
    assert "support_triage" in found


def _choice_with(when: str) -> str:
    return f"""
        name: w
        steps:
          - id: c
            choice:
              cases: [{{when: "{when}", steps: [{{id: a, activity: x}}]}}]
              default: [{{id: d, activity: x}}]
        """


def test_fixed_a_step_reference_inside_a_cel_string_literal_refuses_a_valid_definition():
    """BUG (model.py / expressions.py ``_STEP_REF``): unknown-step detection is a regex over the source text, so
    ``input.kind == 'see steps.foo'`` (a string literal, no step read) is refused with
    "refers to unknown step 'foo'". Expected: the definition compiles."""
    wf = compile_yaml(_choice_with("input.kind == 'see steps.foo'"))
    assert "c.when.0" in wf.expressions


def test_fixed_an_unknown_step_read_by_index_is_not_refused():
    """BUG (same regex): ``steps['ghost'].output == 1`` reads an unknown step but is accepted; it only fails at
    run time (KeyError -> ExpressionError). Expected: DefinitionError at steps[0].choice.cases[0].when."""
    with pytest.raises(DefinitionError) as caught:
        compile_yaml(_choice_with("steps['ghost'].output == 1"))
    assert caught.value.path == "steps[0].choice.cases[0].when"
