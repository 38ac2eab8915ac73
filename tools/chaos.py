"""``legato chaos``: kill real processes on a real broker and count what was lost or duplicated.

Every scenario starts its own ``legato coordinator`` / ``legato worker`` OS processes with a fresh topic prefix and
data dir, drives them only through Kafka, and judges the result only from the topics (``<prefix>.runs``,
``<prefix>.requests.*``, ``<prefix>.completions``, ``<prefix>.dlq``) and the processes' /metrics:

- ``coordinator``: N runs of a workflow with parallel, choice and loop steps; SIGKILL + restart the coordinator K times
- ``worker``: SIGKILL the worker while every run has an activity in its handler; restart it
- ``takeover``: two coordinators on 8 partitions, one SIGKILLed for good; the survivor takes its partitions over
- ``broker``: a private broker (own port and data dir) is stopped and started in the middle of runs
- ``timers``: the coordinator is killed while step timeouts, then retry back-offs, are pending
- ``waits``: N runs wait for a signal and N sleep until a due time; the coordinator is killed while they all wait
  and restarted, then the signals are sent: each waiting run ends with its signal's data, each sleeper after its due time
- ``deploy``: v2 of a workflow is deployed (``legato deploy``) while N v1 runs are in flight, and the coordinator is
  SIGKILLed: every v1 run ends as v1 (only v1's steps requested), every later trigger runs v2
- ``fuzz``: generated bad messages on triggers and completions, interleaved with valid runs
- ``retries``: step timeouts and retries under coordinator kills, answered by an independent worker (``chaos_retries``)
- ``schedules``: a schedule ticking every second while the coordinator is SIGKILLed and restarted: every tick runs
  exactly once (``chaos_schedules``)
- ``cluster``: a private 3-broker cluster (replication 3, min ISR 2): the leader broker SIGKILLed, a rolling restart,
  and a coordinator SIGKILL while a broker is down (``chaos_cluster``)
- ``scale``: coordinators and workers each scaled 1 -> 3 -> 1 (start / SIGTERM) while runs are in flight; duplicate
  executions only of requests in flight at a rebalance (``chaos_scale``)
- ``limits``: limited and keyed runs while a coordinator (and its limiter) is SIGKILLed: rates, concurrencies and
  keyed order held, no grant doubled (``chaos_limits``)

The scenarios live in ``tools/chaos_<name>.py`` and use the harness in ``tools/harness.py``; ``SCENARIOS`` below is the
registry (one line per scenario). Results are printed, and appended to the file given with ``--output`` (command, date,
machine). The integration tests in ``tests/integration/test_reliability.py`` and ``test_fuzz.py`` run the same code at
CI size.
"""
from __future__ import annotations

import asyncio
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

from legato.streams.config import Settings
from legato.tools.harness import (  # noqa: F401  (re-exported: tests and tools import them from here)
    ACTIVITIES, ANSWERED_ELSEWHERE, DATA, HANDLERS_MODULE, REPO_ROOT, TERMINAL, Env, Options, PrivateBroker, Proc, Rec,
    RunWatch, Scene, Tail, answered_in_time, count_by_request, free_port, free_port_pair, group_members, judge,
    legato_executable, machine, metric_sum, mix_expected, producer, scrape, send_all, trigger, wait_ready,
)
from legato.tools.chaos_broker import scenario_broker
from legato.tools.chaos_cluster import scenario_cluster
from legato.tools.chaos_deploy import V1_STEPS, V2_FILE, V2_STEPS, deploy_expected, scenario_deploy  # noqa: F401
from legato.tools.chaos_fuzz import Bad, blowups, generate_bad, scenario_fuzz  # noqa: F401
from legato.tools.chaos_kills import scenario_coordinator, scenario_takeover, scenario_worker
from legato.tools.chaos_limits import scenario_limits
from legato.tools.chaos_payloads import scenario_payloads
from legato.tools.chaos_retries import scenario_retries
from legato.tools.chaos_scale import scenario_scale
from legato.tools.chaos_schedules import scenario_schedules
from legato.tools.chaos_waits import scenario_timers, scenario_waits

Scenario = Callable[[Options], Awaitable[dict[str, Any]]]

SCENARIOS: dict[str, Scenario] = {
    "coordinator": lambda o: scenario_coordinator(o.bootstrap, o.runs, o.kills, o.rate, extra_env=o.extra_env, timeout=o.timeout),
    "worker": lambda o: scenario_worker(o.bootstrap, extra_env=o.extra_env),
    "takeover": lambda o: scenario_takeover(o.bootstrap, min(o.runs, 400), extra_env=o.extra_env),
    "broker": lambda o: scenario_broker(None, min(o.runs, 200), extra_env=o.extra_env),
    "timers": lambda o: scenario_timers(o.bootstrap, extra_env=o.extra_env),
    "waits": lambda o: scenario_waits(o.bootstrap, o.waits if o.waits is not None else min(o.runs, 1000), extra_env=o.extra_env, timeout=o.timeout),
    "deploy": lambda o: scenario_deploy(o.bootstrap, min(o.runs, 1000), o.kills, extra_env=o.extra_env, timeout=o.timeout),
    "fuzz": lambda o: scenario_fuzz(o.bootstrap, o.bad, o.valid, extra_env=o.extra_env, timeout=o.timeout),
    "retries": lambda o: scenario_retries(o.bootstrap, o.runs, o.kills, extra_env=o.extra_env, timeout=o.timeout),
    "schedules": lambda o: scenario_schedules(o.bootstrap, o.kills, extra_env=o.extra_env, timeout=o.timeout),
    "cluster": lambda o: scenario_cluster(o.runs, min(o.rate, 15.0), extra_env=o.extra_env, timeout=o.timeout),
    "scale": lambda o: scenario_scale(o.bootstrap, o.runs, o.rate, extra_env=o.extra_env, timeout=o.timeout),
    "payloads": lambda o: scenario_payloads(o.bootstrap, min(o.runs, 40), o.kills, extra_env=o.extra_env, timeout=o.timeout),
    "limits": lambda o: scenario_limits(o.bootstrap, min(o.runs, 300), o.kills, extra_env=o.extra_env, timeout=o.timeout),
}
"""Every scenario of ``legato chaos``, by name, in the order ``all`` runs them. A scenario is a coroutine function of
``Options`` returning its figures (``scenario`` names it); a result may carry ``checks`` ({goal: bool}), which
``verdict`` requires to be all true, beside the goals every scenario shares."""


# --------------------------------------------------------------------------- report


KEYS = ["runs", "kills", "completed", "lost", "wrong_output", "failed_answered_in_time", "duplicate_terminal_events", "runs_with_duplicate_terminal",
        "distinct_requests", "reissued_requests", "executions", "duplicate_executions", "takeover_s", "recovery_s", "elapsed_s"]


def render(results: list[dict[str, Any]], command: str, mode: str) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"### `{command}` — {now}", "", f"Machine: {machine()}, broker on the same cores (shared with other test runs)  ",
             f"Mode: {mode}", "", "| scenario | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    for r in results:
        lines.append(f"| {r['scenario']} | " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in KEYS) + " |")
    lines.append("")
    for r in results:
        extra = {k: v for k, v in r.items() if k not in KEYS and k not in ("scenario", "lost_ids", "wrong_examples") and v not in (None, [], {})}
        if r.get("lost_ids"):
            extra["lost_ids"] = r["lost_ids"]
        if r.get("wrong_examples"):
            extra["wrong_examples"] = r["wrong_examples"]
        lines.append(f"- **{r['scenario']}**: " + "; ".join(f"{k}: {v}" for k, v in extra.items()))
    return "\n".join(lines) + "\n\n"


def verdict(r: dict[str, Any]) -> bool:
    ok = r.get("lost", 0) == 0 and r.get("all_finished", True) and r.get("wrong_output", 0) == 0 and r.get("conflicting_terminal", 0) == 0 \
        and r.get("duplicate_terminal_events", 0) == 0 and r.get("failed_answered_in_time", 0) == 0 and all(r.get("checks", {}).values())
    if r["scenario"] == "retries":
        ok = ok and r["failed"] == 0
    if r["scenario"] in ("coordinator", "takeover", "cluster"):
        ok = ok and r["duplicate_executions"] == 0
    if r["scenario"] == "fuzz":
        ok = ok and r["dlq_records"] >= r["expected_dlq"] and r["dlq_without_reason"] == 0 and r["processes_alive"] \
            and r["unknown_workflow_runs_failed"] >= r["expected_unknown_workflow_runs"] and r["coordinator_restarts"] == 0
    if r["scenario"] == "timers":
        ok = ok and r["right_output"] == r["runs"]
    if r["scenario"] == "waits":
        ok = ok and r["succeeded"] == r["runs"] and r["ended_early"] == 0 and r["waits_ended_before_their_signal"] == 0 \
            and r["ended_before_kill"] == 0 and r["processes_alive"]
    if r["scenario"] == "deploy":
        ok = ok and r["duplicate_executions"] == 0 and r["switched_version"] == 0 and r["new_not_v2"] == 0 \
            and r["kills"] >= 1 and all(k["v1_in_flight"] > 0 for k in r["kill_log"])
    if r["scenario"] == "broker":
        ok = ok and r["same_pids"] and r["processes_alive"]
    if r["scenario"] == "schedules":
        ok = ok and r["ticks_missed"] == 0 and r["ticks_duplicated"] == 0 and r["ticks_expected"] > 0 and r["processes_alive"] \
            and r["duplicate_executions"] == 0
    if r["scenario"] == "cluster":
        ok = ok and r["processes_alive"] and r["kills"] >= 1
    if r["scenario"] == "scale":
        ok = ok and r["processes_alive"]
    return ok


async def run_scenarios(settings: Settings, scenarios: list[str], runs: int, kills: int, bad: int, valid: int, rate: float,
                        session_timeout: float | None, timeout: float = 900.0, waits: int | None = None) -> list[dict[str, Any]]:
    extra: dict[str, str] = {}
    if session_timeout:
        extra["LEGATO_SESSION_TIMEOUT"] = str(session_timeout)
    options = Options(settings.bootstrap, runs=runs, kills=kills, bad=bad, valid=valid, rate=rate, timeout=timeout, waits=waits, extra_env=extra)
    results = []
    for name in scenarios:
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        r = await SCENARIOS[name](options)
        r.setdefault("scenario", name)
        r.setdefault("elapsed_s", round(time.monotonic() - t0, 1))
        r["ok"] = verdict(r)
        print("  " + ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("kill_log", "by_category", "gap_by_partition_s")), flush=True)
        results.append(r)
    return results


def main(settings: Settings, scenario: str = "all", runs: int = 2000, kills: int = 5, bad: int = 10_000, valid: int = 500,
         rate: float = 40.0, session_timeout: float | None = None, output: Path | None = None,
         command: str | None = None, timeout: float = 900.0, waits: int | None = None) -> int:
    """Run one scenario or all of them, print the figures, append them to ``output``; exit 1 when a goal is missed."""
    import logging

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM still stops every process we started
    if scenario == "list":
        print("\n".join(SCENARIOS))
        return 0
    if scenario != "all" and scenario not in SCENARIOS:
        print(f"unknown scenario {scenario!r}; one of: all, {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    scenarios = list(SCENARIOS) if scenario == "all" else [scenario]
    results = asyncio.run(run_scenarios(settings, scenarios, runs, kills, bad, valid, rate, session_timeout, timeout, waits))
    mode = f"transactional coordinator, consumers read_committed, session timeout {session_timeout or Settings().session_timeout:g} s"
    text = render(results, command or "legato chaos " + " ".join(sys.argv[2:]), mode)
    print(text)
    if output is not None:
        with open(output, "a", encoding="utf-8") as f:
            f.write(text)
    return 0 if all(r["ok"] for r in results) else 1
