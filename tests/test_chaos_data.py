"""legato chaos's workflows and handlers are files under tools/chaos_data, and they fit together."""
import ast

from legato.tools.chaos import ACTIVITIES, DATA, HANDLERS_MODULE
from legato.workflows.model import load_directories


def test_the_chaos_workflows_load_and_their_activities_are_served_or_deliberately_not():
    workflows = load_directories([DATA])
    assert {"chaos_mix", "chaos_slow", "chaos_timer", "chaos_probe"} <= set(workflows)
    used = {a for wf in workflows.values() for a in wf.activities}
    tree = ast.parse((DATA / f"{HANDLERS_MODULE}.py").read_text(encoding="utf-8"))
    served = {d.args[0].value for node in ast.walk(tree) if isinstance(node, ast.AsyncFunctionDef)
              for d in node.decorator_list if isinstance(d, ast.Call) and d.args}
    assert used <= set(ACTIVITIES)
    assert used - served == {"chaos_nobody"}  # only timers can finish the runs that wait on it
