"""A real Prometheus scrapes a running coordinator and worker while the demo workflows run; then every dashboard
and alert expression in ops/ is executed against it and must return data.

Prometheus is Debian's package (`apt-get install -y prometheus`: /usr/bin/prometheus), started here on a
loopback port with a temporary storage directory and a generated config (scrape interval 1 s) that loads the
alert rules of ops/prometheus/rules. The Debian service is not used.

The workload makes every metric exist and move: due_diligence (approve and reject paths) and support_triage
(billing case and the draft loop) several times, a workflow whose parallel step fails, a loop that stops at
max_iterations, a step waiting for a limit and refused once by a 429, a trigger for an unknown workflow, a duplicate
trigger and a malformed trigger (dead letter).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiokafka import AIOKafkaProducer

from legato.streams.runs import load_run, render_gantt, render_table
from tests.integration.conftest import EXAMPLES_DIR, REPO_ROOT, Service, _start
from legato.topics.client import LegatoClient

pytestmark = pytest.mark.integration

OPS = REPO_ROOT / "ops"
DASHBOARDS = sorted((OPS / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted((OPS / "prometheus" / "rules").glob("*.yml"))
ROUNDS = 3
# What Grafana would put in the queries; a wide rate window because the whole test lasts about a minute.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "10m", "$__interval": "15s", "$workflow": ".*", "$activity": ".*"}

EXTRA_WORKFLOWS = {
    "metrics_failing.yaml": """\
name: metrics_failing
steps:
  - id: checks
    parallel:
      branches:
        fine: [{id: fine, activity: noop, input: {ok: true}}]
        broken: [{id: broken, activity: always_fails, input: {retryable: false}}]
""",
    "metrics_polish.yaml": """\
name: metrics_polish
steps:
  - id: polish
    loop:
      max_iterations: 2
      until: "steps.attempt.output.done == true"
      on_exhausted: continue
      steps: [{id: attempt, activity: noop, input: {done: false}}]
""",
    "metrics_cache.yaml": """\
name: metrics_cache
steps:
  - {id: lookup, activity: noop, input: {q: same}, cache: {ttl: 1h}}
""",
    "metrics_wait.yaml": """\
name: metrics_wait
steps:
  - id: approval
    wait: {signal: approve, timeout: 200ms, on_timeout: continue}
""",
    # a limited step refused once for a rate limit: a grant, a 429's pause of the key, a grant again (docs/limits.md)
    "metrics_limited.yaml": """\
name: metrics_limited
limits:
  metrics_api: {requests_per_minute: 6000, tokens_per_minute: 1000000, concurrency: 4}
steps:
  - id: call
    activity: e2e_rate_limited
    input: {run_id: "${ input.run_id }", retry_after: 0.2}
    limit: metrics_api
    limit_key: "${ input.tenant }"
    approx_tokens: 100
    retry: {max_attempts: 2, backoff: 1m}
""",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class Observed:
    bootstrap: str
    prefix: str
    prometheus: str  # base URL
    coordinator_port: int
    worker_port: int
    services: list[Service]
    workdir: Path
    run_ids: dict[str, list[str]] = field(default_factory=dict)

    def query(self, expr: str) -> dict:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return http_json(url)
        except urllib.error.HTTPError as exc:  # 400/422: a bad expression; the body says why
            return json.loads(exc.read() or b"{}") or {"status": "error", "error": str(exc)}

    def logs(self) -> str:
        out = "\n".join(s.logs() for s in self.services)
        prom = self.workdir / "prometheus.log"
        if prom.exists():
            out += "\n--- prometheus\n" + "\n".join(prom.read_text(errors="replace").splitlines()[-30:])
        return out


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(path).exists(), "prometheus not found: apt-get install -y prometheus"
    return path


def write_prometheus_config(workdir: Path, coordinator_port: int, worker_port: int) -> Path:
    rules = workdir / "rules"
    rules.mkdir()
    for path in RULE_FILES:
        shutil.copy(path, rules / path.name)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules / "*.yml")],
        "scrape_configs": [
            {"job_name": "legato-coordinator", "static_configs": [{"targets": [f"127.0.0.1:{coordinator_port}"]}]},
            {"job_name": "legato-worker", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]},
        ],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    check = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    return path


def start_prometheus(workdir: Path, config: Path, port: int) -> subprocess.Popen:
    log = open(workdir / "prometheus.log", "wb")
    return subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


async def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # not up yet
            last = exc
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout}s (last error: {last!r})")


def last_scrapes(base: str) -> list[float]:
    """Each active target's last scrape, in epoch seconds (Prometheus gives RFC 3339 with nanoseconds)."""
    out = []
    for target in http_json(f"{base}/api/v1/targets")["data"]["activeTargets"]:
        stamp = re.sub(r"(\.\d{6})\d+", r"\1", target["lastScrape"]).replace("Z", "+00:00")
        out.append(datetime.fromisoformat(stamp).timestamp())
    return out


async def scraped_twice(obs: "Observed", what: str) -> None:
    """Until Prometheus has scraped both targets twice since now: what the processes count now is in two samples."""
    for _ in range(2):
        since = time.time()
        await wait_until(lambda: (lambda s: len(s) == 2 and min(s) > since)(last_scrapes(obs.prometheus)), 30, f"two scrapes after {what}")


def targets_up(base: str) -> bool:
    active = http_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
    return len(active) == 2 and all(t["health"] == "up" for t in active)


async def workload_round(obs: Observed, client: LegatoClient, producer: AIOKafkaProducer, n: int) -> None:
    runs = {
        "due_diligence": [{"name": "Ada", "credit_score": 742, "references": ["a", "b"]}, {"name": "Mallory", "credit_score": 700}],
        "support_triage": [{"text": "my invoice is wrong", "email": "a@b.com"}, {"text": "an error on login", "email": "c@d.org"}],
        "metrics_failing": [{}],
        "metrics_polish": [{}],
        "metrics_cache": [{}],  # the same input every round: a miss, then hits answered by the coordinator
        "metrics_wait": [{}],  # waits for a signal nobody sends: times out and goes on
        "metrics_limited": [{"run_id": f"limited-{obs.prefix}-{n}", "tenant": "acme"}],  # 429 once, then granted again
        "no_such_workflow": [{}],
    }
    ids: set[str] = set()
    for workflow, inputs in runs.items():
        for payload in inputs:
            run_id = await client.trigger(workflow, payload)
            ids.add(run_id)
            obs.run_ids.setdefault(workflow, []).append(run_id)
    duplicate = f"dup-{obs.prefix}-{n}"
    await client.trigger("support_triage", {"text": "invoice", "email": "x@y.com"}, run_id=duplicate)
    await client.trigger("support_triage", {"text": "invoice", "email": "x@y.com"}, run_id=duplicate)  # ignored: duplicate_trigger
    ids.add(duplicate)
    await producer.send_and_wait(f"{obs.prefix}.triggers", b"this is not json", key=b"junk")  # dead letter
    events = await client.wait_for(ids, timeout=60)
    statuses = {e.workflow: e.status for e in events.values()}
    assert statuses["due_diligence"] == "succeeded" and statuses["metrics_failing"] == "failed", statuses
    assert statuses["metrics_limited"] == "succeeded", statuses


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def observed(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory):
    prefix = f"pm{uuid.uuid4().hex[:12]}"
    workdir = tmp_path_factory.mktemp("legato-prometheus")
    extra = workdir / "workflows"
    extra.mkdir()
    for name, text in EXTRA_WORKFLOWS.items():
        (extra / name).write_text(text, encoding="utf-8")
    (workdir / "data").mkdir()
    coordinator_port, worker_port, prometheus_port = free_port(), free_port(), free_port()
    base_env = {
        **os.environ,
        "LEGATO_BOOTSTRAP": kafka_bootstrap,
        "LEGATO_TOPIC_PREFIX": prefix,
        "LEGATO_WORKFLOWS": os.pathsep.join([str(EXAMPLES_DIR), str(extra)]),
        "LEGATO_HANDLERS": "legato.handlers.examples.demo,tests.integration.e2e_handlers",
        "LEGATO_DEMO_SCALE": "0.05",
        "LEGATO_DATA_DIR": str(workdir / "data"),
        "LEGATO_LOGLEVEL": "info",
        "PYTHONUNBUFFERED": "1",
    }
    services = [
        _start("coordinator", ["coordinator"], {**base_env, "LEGATO_METRICS_PORT": str(coordinator_port)}, workdir),
        _start("worker", ["worker"], {**base_env, "LEGATO_METRICS_PORT": str(worker_port)}, workdir),
    ]
    obs = Observed(kafka_bootstrap, prefix, f"http://127.0.0.1:{prometheus_port}", coordinator_port, worker_port, services, workdir)
    prometheus = start_prometheus(workdir, write_prometheus_config(workdir, coordinator_port, worker_port), prometheus_port)
    client = LegatoClient(kafka_bootstrap, prefix)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=0)
    try:
        await client.__aenter__()
        await producer.start()
        # ready: both processes consume (a run completes) and Prometheus scrapes both
        deadline = time.monotonic() + 60
        while True:
            dead = [s for s in services if s.proc.poll() is not None]
            assert not dead, "legato process exited:\n" + obs.logs()
            try:
                event = await client.run("metrics_polish", {}, timeout=10)
                assert event.status == "succeeded", event
                break
            except (asyncio.TimeoutError, RuntimeError):  # RuntimeError: the coordinator has not created the topics yet
                assert time.monotonic() < deadline, "legato not ready in 60s\n" + obs.logs()
        await wait_until(lambda: urllib.request.urlopen(f"{obs.prometheus}/-/ready", timeout=2).status == 200, 30, "prometheus ready")
        try:
            await wait_until(lambda: targets_up(obs.prometheus), 20, "both scrape targets up")
        except AssertionError:
            pass  # test_both_processes_are_scraped says so, with the logs; the changelog test still runs
        for n in range(ROUNDS):
            await workload_round(obs, client, producer, n)
            await scraped_twice(obs, f"round {n}")  # between rounds: counters visibly increase from one scrape to the next
        lag = [f'legato_consumer_lag{{group="{prefix}-{role}"}}' for role in ("coordinator", "worker")]
        await wait_until(lambda: all(has_data(obs.query(q)) for q in lag), 30, "the lag reporters' gauges of both groups scraped")
        # the coordinator's legato_runs_in_flight is its committed table at each scrape, and Prometheus scrapes every
        # second: wait for a scrape after the last run's terminal commit
        await wait_until(lambda: float(obs.query("sum(legato_runs_in_flight)")["data"]["result"][0]["value"][1]) == 0, 30,
                         "legato_runs_in_flight back to 0 once every run has ended")
        await scraped_twice(obs, "the end")
        yield obs
    finally:
        await producer.stop()
        await client.__aexit__(None, None, None)
        prometheus.terminate()
        try:
            prometheus.wait(10)
        except subprocess.TimeoutExpired:
            prometheus.kill()
        for s in services:
            s.stop()


def grafana_to_promql(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    match = re.fullmatch(r"\s*label_values\((\w+),\s*(\w+)\)\s*", expr)
    if match:  # a variable query: the metric must have the label
        expr = f"group by ({match[2]}) ({match[1]}{{{match[2]}!=\"\"}})"
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr}"
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())

        def walk(panels: list[dict]) -> None:
            for p in panels:
                for t in p.get("targets", []):
                    if t.get("expr"):
                        out.append((f"{path.stem} / {p['title']} / {t['refId']}", t["expr"]))
                walk(p.get("panels", []))

        walk(doc["panels"])
        for var in doc["templating"]["list"]:
            if var.get("type") == "query":
                out.append((f"{path.stem} / variable {var['name']}", var["definition"]))
    return out


def has_data(result: dict) -> bool:
    """success, and at least one sample with a finite value."""
    if result.get("status") != "success":
        return False
    data = result["data"]
    rows = data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]
    for row in rows:
        values = [row["value"]] if "value" in row else row.get("values", [])
        if any(math.isfinite(float(v[1])) for v in values):
            return True
    return False


def test_both_processes_are_scraped(observed: Observed):
    active = http_json(f"{observed.prometheus}/api/v1/targets")["data"]["activeTargets"]
    health = {t["labels"]["job"]: (t["health"], t.get("lastError")) for t in active}
    assert health == {"legato-coordinator": ("up", ""), "legato-worker": ("up", "")}, f"{health}\n{observed.logs()}"


def test_every_dashboard_expression_returns_data(observed: Observed):
    queries = dashboard_queries()
    assert len(queries) > 40
    problems = []
    for where, expr in queries:
        result = observed.query(grafana_to_promql(expr))
        if not has_data(result):
            problems.append(f"{where}: {expr}\n    -> {json.dumps(result)[:300]}")
    assert not problems, f"{len(problems)} of {len(queries)} dashboard queries without data:\n" + "\n".join(problems)


def test_every_alert_expression_is_valid_and_measures_something(observed: Observed):
    rules = [r for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
    assert rules
    problems = []
    for rule in rules:
        expr = rule["expr"]
        as_written = observed.query(expr)
        if as_written.get("status") != "success":
            problems.append(f"{rule['alert']}: {expr}\n    -> {as_written}")
            continue
        # An alert expression has data only while it fires; its measurement must have data now.
        measured = re.sub(r"\s(>|<|>=|<=)\s*([0-9.]+)\s*$", r" \1 bool \2", expr.strip())
        assert measured != expr.strip(), rule["alert"]
        result = observed.query(measured)
        if not has_data(result):
            problems.append(f"{rule['alert']}: {measured}\n    -> {json.dumps(result)[:300]}")
    assert not problems, "\n".join(problems)
    rules_api = http_json(f"{observed.prometheus}/api/v1/rules")["data"]["groups"]
    loaded = [r for g in rules_api for r in g["rules"]]
    assert {r["name"] for r in loaded} == {r["alert"] for r in rules}
    assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]


def test_metric_values_follow_the_demo(observed: Observed):
    def value(expr: str) -> float:
        result = observed.query(expr)
        assert result["status"] == "success" and result["data"]["result"], f"{expr}: {result}"
        return float(result["data"]["result"][0]["value"][1])

    # every round's runs are counted, plus the readiness run
    assert value('sum(legato_runs_started_total{workflow="due_diligence"})') == 2 * ROUNDS
    assert value('sum(legato_runs_completed_total{workflow="support_triage"})') == 3 * ROUNDS
    assert value('sum(legato_runs_failed_total{workflow="metrics_failing", error_type="DemoFailure"})') == ROUNDS
    assert value('sum(legato_runs_failed_total{workflow="_unknown_", error_type="UnknownWorkflow"})') == ROUNDS
    assert value('sum(legato_choice_paths_total{workflow="due_diligence", step="decide", path="case1"})') == ROUNDS
    assert value('sum(legato_choice_paths_total{workflow="due_diligence", step="decide", path="case0"})') == ROUNDS
    polished = value('sum(legato_loop_endings_total{workflow="metrics_polish", ended_by="max_iterations"})')
    assert polished >= ROUNDS + 1  # and the readiness run(s)
    assert value('sum(legato_loop_iterations_sum{workflow="metrics_polish"})') == 2 * polished
    assert value('sum(legato_loop_endings_total{workflow="support_triage", step="draft", ended_by="until"})') == ROUNDS
    assert value('sum(legato_dead_letters_total{reason="bad_trigger"})') == ROUNDS
    assert value('sum(legato_events_ignored_total{reason="duplicate_trigger"})') >= ROUNDS
    assert value('sum(legato_parallel_potential_concurrency_sum{workflow="due_diligence"})') == 4 * 2 * ROUNDS
    assert value('sum(legato_step_failures_total{workflow="metrics_failing", kind="parallel", step="checks"})') == ROUNDS
    assert value('sum(legato_activity_errors_total{activity="always_fails", error_type="DemoFailure"})') == ROUNDS
    assert value('sum(legato_cost_usd_total{model="credit-bureau"})') == pytest.approx(0.01 * 2 * ROUNDS)
    assert value(f'max(legato_consumer_lag{{group="{observed.prefix}-coordinator"}})') >= 0
    assert value(f'count(legato_consumer_lag{{group="{observed.prefix}-worker"}})') >= 1
    assert value("sum(legato_runs_in_flight)") == 0
    assert value('sum(legato_cache_misses_total{workflow="metrics_cache", step="lookup"})') == 1
    assert value('sum(legato_cache_hits_total{workflow="metrics_cache", step="lookup"})') == ROUNDS - 1
    # bounded labels: nothing is labelled by run
    assert observed.query('count({__name__=~"legato_.+", run_id!=""})')["data"]["result"] == []


async def test_runs_show_reads_the_coordinator_changelog(observed: Observed):
    run_id = observed.run_ids["due_diligence"][0]
    state = await load_run(observed.bootstrap, observed.prefix, run_id)
    assert state is not None and state.run_id == run_id and state.status == "succeeded"
    assert state.steps["checks"].kind == "parallel"
    table = render_table(state)
    assert "checks/identity/identity" in table and "case1" in table
    chart = render_gantt(state)
    spans = {}
    for line in chart.splitlines():
        m = re.match(r"\s+(\S+) \(.*:\S*?\s*s\d+, (\d+), (\d+)$", line)
        if m:
            spans[m[1]] = (int(m[2]), int(m[3]))
    branches = [v for k, v in spans.items() if k.startswith("checks/")]
    assert len(branches) == 4
    assert max(s for s, _ in branches) < min(e for _, e in branches), "the four checks ran at the same time"
    assert await load_run(observed.bootstrap, observed.prefix, "no-such-run") is None
