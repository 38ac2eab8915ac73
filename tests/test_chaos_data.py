"""legato chaos's workflows and handlers are files under tools/chaos_data, and they fit together."""
import ast

from legato.tools.chaos import ACTIVITIES, ANSWERED_ELSEWHERE, DATA, HANDLERS_MODULE
from legato.workflows.model import load_directories


def test_the_chaos_workflows_load_and_their_activities_are_served_or_deliberately_not():
    workflows = load_directories([DATA])
    assert {"chaos_mix", "chaos_slow", "chaos_timer", "chaos_probe"} <= set(workflows)
    used = {a for wf in workflows.values() for a in wf.activities}
    tree = ast.parse((DATA / f"{HANDLERS_MODULE}.py").read_text(encoding="utf-8"))
    served = {d.args[0].value for node in ast.walk(tree) if isinstance(node, ast.AsyncFunctionDef)
              for d in node.decorator_list if isinstance(d, ast.Call) and d.args}
    assert used <= set(ACTIVITIES)
    # only timers can finish the runs that wait on chaos_nobody; the others are answered by an independent worker or a test
    assert used - served == {"chaos_nobody", *ANSWERED_ELSEWHERE}


def test_the_deploy_scenarios_v2_is_a_new_version_with_other_step_ids():
    from legato.tools.chaos import V1_STEPS, V2_FILE, V2_STEPS

    v1 = load_directories([DATA])["chaos_deploy"]
    v2 = load_directories([V2_FILE.parent])["chaos_deploy"]
    assert (v1.version, v2.version) == (1, 2)
    assert set(v2.activities) <= set(ACTIVITIES)
    assert {s.id for s in v1.definition.steps} == V1_STEPS and {s.id for s in v2.definition.steps} == V2_STEPS
    assert not V1_STEPS & V2_STEPS
