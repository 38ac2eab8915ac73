"""legato chaos's workflows and handlers are files under tools/chaos_data, and they fit together."""
import ast

from legato.tools.harness import ACTIVITIES, ANSWERED_ELSEWHERE, DATA, HANDLERS_MODULE
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
    from legato.tools.chaos_deploy import V1_STEPS, V2_FILE, V2_STEPS

    v1 = load_directories([DATA])["chaos_deploy"]
    v2 = load_directories([V2_FILE.parent])["chaos_deploy"]
    assert (v1.version, v2.version) == (1, 2)
    assert set(v2.activities) <= set(ACTIVITIES)
    assert {s.id for s in v1.definition.steps} == V1_STEPS and {s.id for s in v2.definition.steps} == V2_STEPS
    assert not V1_STEPS & V2_STEPS


OLD_NAMES = ["ACTIVITIES", "ANSWERED_ELSEWHERE", "DATA", "HANDLERS_MODULE", "Env", "PrivateBroker", "Proc", "RunWatch", "Scene", "Tail",
             "answered_in_time", "blowups", "free_port", "free_port_pair", "generate_bad", "judge", "legato_executable", "metric_sum",
             "mix_expected", "producer", "scenario_broker", "scenario_coordinator", "scenario_deploy", "scenario_fuzz",
             "scenario_takeover", "scenario_timers", "scenario_waits", "scenario_worker", "scrape", "trigger", "wait_ready",
             "V1_STEPS", "V2_FILE", "V2_STEPS"]


def test_the_names_tests_and_tools_imported_from_tools_chaos_still_import_from_there():
    from legato.tools import chaos

    missing = [n for n in OLD_NAMES if not hasattr(chaos, n)]
    assert not missing


def test_every_scenario_of_the_registry_is_a_coroutine_function_of_the_options():
    import inspect

    from legato.tools.chaos import SCENARIOS
    from legato.tools.harness import Options

    assert {"coordinator", "worker", "takeover", "broker", "timers", "waits", "deploy", "fuzz", "retries", "schedules", "cluster"} <= set(SCENARIOS)
    for name, scenario in SCENARIOS.items():
        assert len(inspect.signature(scenario).parameters) == 1, name
        made = scenario(Options("localhost:1"))  # a coroutine, not yet run: nothing is started
        assert inspect.iscoroutine(made), name
        made.close()


def test_the_chaos_cli_rejects_an_unknown_scenario_without_starting_anything(capsys):
    from legato.streams.config import Settings
    from legato.tools.chaos import main

    assert main(Settings(bootstrap="localhost:1"), "no-such-scenario") == 2
    assert "unknown scenario 'no-such-scenario'" in capsys.readouterr().err
