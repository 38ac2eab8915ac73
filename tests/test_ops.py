"""ops/: Prometheus config and alert rules (checked and unit-tested by promtool), Grafana provisioning and dashboards.

promtool comes from Debian's `prometheus` package (`apt-get install -y prometheus`); the tests fail, not skip,
without it.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from legato.streams.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
PROMETHEUS_YML = OPS / "prometheus" / "prometheus.yml"
RULE_FILES = sorted((OPS / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((OPS / "prometheus" / "tests").glob("*.yml"))
DASHBOARDS = sorted((OPS / "grafana" / "dashboards").glob("*.json"))
METRIC_NAME = re.compile(r"\blegato_[a-z0-9_]+\b")


def promtool() -> str:
    path = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    assert path, "promtool not found: apt-get install -y prometheus"
    return path


def run_promtool(*args: str) -> str:
    proc = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def exported_names() -> set[str]:
    """Every sample name the Metrics registry can export (counters with _total, histograms' series)."""
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def dashboard_exprs(doc: dict) -> list[str]:
    exprs = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(doc.get("panels", []))
    return exprs


def alert_rules() -> list[dict]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend(group["rules"])
    return rules


def test_prometheus_config_is_valid():
    out = run_promtool("check", "config", str(PROMETHEUS_YML))
    assert f"{len(RULE_FILES)} rule files found" in out


def test_alert_rules_are_valid():
    assert RULE_FILES
    run_promtool("check", "rules", *map(str, RULE_FILES))


def test_alert_rules_pass_their_unit_tests():
    assert RULE_TESTS
    run_promtool("test", "rules", *map(str, RULE_TESTS))


def test_every_alert_has_a_unit_test():
    tested = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    tested.add(check["alertname"])
    names = {r["alert"] for r in alert_rules() if "alert" in r}
    assert names >= {"LegatoRunFailureRateHigh", "LegatoDeadLettersGrowing", "LegatoConsumerLagGrowing", "LegatoStepOverheadP99High", "LegatoLoopHitsMaxIterations"}
    assert names - tested == set(), "alerts without a firing unit test"


def test_scrape_targets_match_compose_ports():
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["legato-coordinator"]["static_configs"][0]["targets"] == ["coordinator:9464"]
    assert jobs["legato-worker"]["dns_sd_configs"][0]["port"] == 9465
    assert compose["services"]["coordinator"]["environment"]["LEGATO_METRICS_PORT"] == "9464"
    assert compose["services"]["worker"]["environment"]["LEGATO_METRICS_PORT"] == "9465"


def test_compose_mounts_the_provisioning():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert "./ops/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert "./ops/grafana/provisioning:/etc/grafana/provisioning:ro" in services["grafana"]["volumes"]
    assert "./ops/grafana/dashboards:/var/lib/grafana/dashboards:ro" in services["grafana"]["volumes"]
    providers = yaml.safe_load((OPS / "grafana" / "provisioning" / "dashboards" / "legato.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasources = yaml.safe_load((OPS / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasources[0]["uid"] == "prometheus" and datasources[0]["url"] == "http://prometheus:9090"


def test_dashboards_are_complete_and_consistent():
    assert {p.stem for p in DASHBOARDS} == {"legato-overview", "legato-workflow", "legato-activities"}
    uids = set()
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        assert doc["uid"] not in uids
        uids.add(doc["uid"])
        ids = []
        for panel in doc["panels"]:
            ids.append(panel["id"])
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, (path.name, panel["title"])
            assert panel["targets"], (path.name, panel["title"])
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs))
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
    workflow = json.loads((OPS / "grafana" / "dashboards" / "legato-workflow.json").read_text())
    assert [v["name"] for v in workflow["templating"]["list"]] == ["workflow"]
    assert all('workflow=~"$workflow"' in e for e in dashboard_exprs(workflow))


def test_queries_use_only_exported_metrics():
    """A panel or rule about a metric that Metrics does not export would stay empty forever."""
    exported = exported_names()
    used: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        for expr in dashboard_exprs(doc):
            used.setdefault(path.name, set()).update(METRIC_NAME.findall(expr))
        for var in doc["templating"]["list"]:
            used[path.name].update(METRIC_NAME.findall(var["definition"]))
    for rule in alert_rules():
        used.setdefault("rules", set()).update(METRIC_NAME.findall(rule["expr"]))
    for where, names in used.items():
        assert names <= exported, f"{where}: unknown metrics {sorted(names - exported)}"


def test_issue_panels_are_present():
    """Each metric of the issue is on a dashboard."""
    text = " ".join(" ".join(dashboard_exprs(json.loads(p.read_text()))) for p in DASHBOARDS)
    for name in [
        "legato_run_duration_seconds_bucket", "legato_runs_started_total", "legato_runs_completed_total", "legato_runs_failed_total",
        "legato_runs_in_flight", "legato_activity_wait_seconds_bucket", "legato_activity_execution_seconds_bucket",
        "legato_parallel_achieved_concurrency_sum", "legato_parallel_potential_concurrency_sum", "legato_activities_in_flight",
        "legato_choice_paths_total", "legato_loop_iterations_bucket", "legato_loop_endings_total", "legato_step_failures_total",
        "legato_run_cost_usd_sum", "legato_run_tokens_sum", "legato_cost_usd_total", "legato_coordinator_events_total",
        "legato_events_ignored_total", "legato_dead_letters_total", "legato_consumer_lag", "legato_step_overhead_seconds_bucket",
        "legato_step_duration_seconds_bucket", "legato_activity_errors_total", "legato_cache_hits_total", "legato_cache_misses_total",
        "legato_limit_wait_seconds_bucket", "legato_limit_requests", "legato_limit_tokens", "legato_limit_concurrency_in_use",
        "legato_limit_value", "legato_limit_pauses_total", "legato_limit_grants_total", "legato_limit_waiting",
    ]:
        assert name in text, f"no panel shows {name}"


def test_alert_expressions_have_a_single_top_level_threshold():
    """tests/integration/test_prometheus.py evaluates each alert's measurement with `bool`: keep the shape."""
    for rule in alert_rules():
        assert re.fullmatch(r"(?s).+\s(>|<|>=|<=)\s[0-9.]+\s*", rule["expr"]), rule["alert"]
