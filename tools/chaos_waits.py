"""Chaos scenarios about time: ``timers`` (the coordinator killed while step timeouts and retry back-offs are
pending) and ``waits`` (runs waiting for signals or sleeping while the coordinator is killed)."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import orjson

from legato.tools.harness import Env, Rec, Scene, Tail, judge, send_all, trigger, wait_ready


async def scenario_timers(bootstrap: str, runs: int = 10, extra_env: dict[str, str] | None = None, timeout: float = 300.0,
                          say: Callable[[str], None] = print, workdir: Path | None = None) -> dict[str, Any]:
    """chaos_timer runs wait on an activity nobody serves: only timers can finish them. The coordinator is killed
    while every run's step timeout is pending and stays down past its due time; restarted; killed again while every
    run's retry back-off is pending and down past it; restarted. Every run must still end (by the on_error default
    after the second attempt's timeout), and each attempt's request must have been issued."""
    env = Env(bootstrap, workdir, extra_env=extra_env)
    changelog = env.topics.changelog
    states: dict[str, dict] = {}
    async with Scene(env) as scene:
        coord = env.process("coordinator")
        worker = env.process("worker")  # serves chaos_probe's chaos_echo only
        watch, prod = scene.watch, scene.prod
        await wait_ready(env, prod, watch, [coord, worker])
        ct = await Tail(bootstrap, [changelog, env.topics.requests("chaos_nobody")]).start()

        def on_state(rec: Rec) -> None:
            if rec.topic == changelog and rec.key and rec.key.startswith(b"timer-"):
                v = rec.json()
                if isinstance(v, dict):
                    states[rec.key.decode()] = v

        ct.listeners.append(on_state)
        ids = [f"timer-{i}" for i in range(runs)]
        for rid in ids:
            await trigger(prod, env, "chaos_timer", {}, rid)
        await prod.flush()
        phases = []
        for phase, pattern in (("step timeout", ":timeout:1"), ("retry back-off", ":retry:1")):
            deadline = time.monotonic() + timeout
            while not all(rid in states and any(pattern in t for t in states[rid].get("timers", {})) for rid in ids):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timers {pattern} never pending for all runs:\n{env.logs()}")
                await asyncio.sleep(0.05)
            due = max(t["due_ms"] for rid in ids for k, t in states[rid]["timers"].items() if pattern in k) / 1000
            t_kill = coord.kill()
            await asyncio.sleep(max(0.0, due - time.time()) + 1.0)
            t_restart = time.time()
            coord.start()
            phases.append({"phase": phase, "killed_s_before_due": round(due - t_kill, 2), "restarted_s_after_due": round(t_restart - due, 2)})
            say(f"  {phase}: SIGKILL {due - t_kill:.1f}s before the timers were due; restarted {t_restart - due:.1f}s after")
        finished = await watch.wait(set(ids), timeout, progress=say)
        await asyncio.sleep(1.0)
        attempts = Counter()
        for r in ct.records:
            v = r.json()
            if r.topic != changelog and isinstance(v, dict) and v.get("run_id") in ids:
                attempts[v["attempt"]] += 1
        ok = [r for r in ids if r in watch.terminal and watch.terminal[r][0]["status"] == "succeeded"
              and watch.terminal[r][0].get("output") == {"timed_out": True}]
        await ct.stop()
        return {"scenario": "timers", "runs": runs, "kills": 2, "phases": phases, "all_finished": finished,
                "completed": watch.done(ids), "lost": runs - watch.done(ids), "right_output": len(ok),
                "requests_by_attempt": dict(sorted(attempts.items())),
                "duplicate_terminal_events": sum(len(watch.terminal[r]) - 1 for r in ids if r in watch.terminal),
                "processes_alive": coord.alive(), "prefix": env.prefix}


def _epoch_ms(iso: str | None) -> int | None:
    if not iso:
        return None
    return round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


async def scenario_waits(bootstrap: str, runs: int = 1000, extra_env: dict[str, str] | None = None, timeout: float = 900.0,
                         say: Callable[[str], None] = print, workdir: Path | None = None, spread_s: float = 10.0, lead_s: float | None = None) -> dict[str, Any]:
    """``runs`` chaos_wait runs wait for the signal ``go`` and ``runs`` chaos_sleep runs sleep until a due time of
    their own (spread over ``spread_s``). Once every one of them waits or sleeps (read from the changelog), the
    coordinator is SIGKILLed; it stays down until half the sleepers are due, and is restarted; then every waiting
    run is sent its signal (twice, with the same ``signal_id``, as a retrying sender would). Every waiting run must
    end with its signal's data, every sleeper after (never before) its due time; none lost, none ended twice."""
    env = Env(bootstrap, workdir, extra_env=extra_env)
    changelog = env.topics.changelog
    waiting: set[str] = set()
    sleeping: set[str] = set()
    async with Scene(env) as scene:
        coord = env.process("coordinator")
        worker = env.process("worker")  # serves chaos_probe's chaos_echo only
        watch, prod = scene.watch, scene.prod
        await wait_ready(env, prod, watch, [coord, worker])
        ct = await Tail(bootstrap, [changelog]).start()

        def on_state(rec: Rec) -> None:
            if rec.key is None or not (rec.key.startswith(b"wait-") or rec.key.startswith(b"sleep-")):
                return
            v = rec.json()
            if not isinstance(v, dict):
                return
            rid = rec.key.decode()
            if rid.startswith("wait-") and any(s.get("status") == "waiting" and s.get("signal") == "go" for s in v.get("steps", {}).values()):
                waiting.add(rid)
            elif rid.startswith("sleep-") and any(t.get("kind") == "sleep" for t in v.get("timers", {}).values()):
                sleeping.add(rid)

        ct.listeners.append(on_state)
        wait_ids = [f"wait-{i}" for i in range(runs)]
        sleep_ids = [f"sleep-{i}" for i in range(runs)]
        # the sleepers fall due from `lead` s on: time enough to start every run (on two shared cores) and kill
        lead = lead_s if lead_s is not None else 20.0 + runs * 0.02
        t0 = time.time()
        first_due_ms = round((t0 + lead) * 1000)
        due = {rid: first_due_ms + round(spread_s * 1000 * i / max(1, runs - 1)) for i, rid in enumerate(sleep_ids)}
        triggers = [(rid.encode(), orjson.dumps({"workflow": "chaos_wait", "input": {"n": i}, "run_id": rid})) for i, rid in enumerate(wait_ids)]
        triggers += [(rid.encode(), orjson.dumps({"workflow": "chaos_sleep", "input": {"n": i, "due_ms": due[rid]}, "run_id": rid}))
                     for i, rid in enumerate(sleep_ids)]
        await send_all(prod, env.topics.triggers, triggers)
        say(f"  {runs} waiting and {runs} sleeping runs triggered in {time.time() - t0:.1f}s (prefix {env.prefix}, logs {env.workdir})")
        deadline = time.monotonic() + timeout
        while len(waiting) < runs or len(sleeping | (set(sleep_ids) & set(watch.terminal))) < runs:  # (one that ended: judged below)
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(waiting)} runs waiting and {len(sleeping)} sleeping after {timeout}s:\n{env.logs()}")
            await asyncio.sleep(0.1)
        all_in_at = time.time()
        ended_before_kill = watch.done(wait_ids) + watch.done(sleep_ids)
        t_kill = coord.kill()
        asleep_at_kill = sum(1 for rid in sleep_ids if due[rid] > t_kill * 1000 and rid not in watch.terminal)
        say(f"  all waiting/sleeping {all_in_at - t0:.1f}s after the first trigger; SIGKILL coordinator with {asleep_at_kill} runs asleep "
            f"(first due in {first_due_ms / 1000 - t_kill:.1f}s)")
        # down until the first half of the sleepers has fallen due
        middle_ms = first_due_ms + round(spread_s * 500)
        await asyncio.sleep(max(1.0, middle_ms / 1000 - time.time()))
        t_restart = time.time()
        coord.start()
        due_while_down = sum(1 for d in due.values() if t_kill * 1000 < d <= t_restart * 1000)
        say(f"  restarted after {t_restart - t_kill:.1f}s down ({due_while_down} sleepers fell due meanwhile); sending {runs} signals, each twice")
        data = {rid: {"n": i, "run": rid, "token": uuid.uuid4().hex[:8]} for i, rid in enumerate(wait_ids)}
        signals = [(rid.encode(), orjson.dumps({"run_id": rid, "signal": "go", "data": data[rid], "signal_id": f"go-{rid}"})) for rid in wait_ids]
        t_signals = time.time()
        await send_all(prod, env.topics.signals, signals)
        await send_all(prod, env.topics.signals, signals)  # a retrying sender: the same signal_id again
        finished = await watch.wait(set(wait_ids) | set(sleep_ids), timeout, progress=say)
        await asyncio.sleep(3.0)  # let late duplicates arrive
        await ct.stop()
        expected: dict[str, Any] = {**data, **{rid: {"n": i, "due_ms": due[rid]} for i, rid in enumerate(sleep_ids)}}
        result = judge(expected, watch, [], [])
        early, late = [], []
        for rid in sleep_ids:
            events = watch.terminal.get(rid)
            if not events:
                continue
            ended_ms = _epoch_ms(events[0].get("finished_at"))
            record_ms = watch.terminal_recs[rid][0].timestamp
            if ended_ms is None or ended_ms < due[rid] or record_ms < due[rid]:
                early.append((rid, due[rid], ended_ms, record_ms))
            else:
                late.append((ended_ms - max(due[rid], round(t_restart * 1000))) / 1000)
        wait_ends = [_epoch_ms(watch.terminal[r][0].get("finished_at")) for r in wait_ids if watch.terminal.get(r)]
        ended_before_signal = sum(1 for ms in wait_ends if ms is not None and ms < t_signals * 1000)
        result.update({
            "scenario": "waits", "kills": 1, "waiting_runs": runs, "sleeping_runs": runs, "all_finished": finished,
            "ended_before_kill": ended_before_kill, "asleep_at_kill": asleep_at_kill, "due_while_down": due_while_down,
            "down_s": round(t_restart - t_kill, 1), "ended_early": len(early), "early_examples": early[:3],
            "waits_ended_before_their_signal": ended_before_signal,
            "sleep_late_s_max": round(max(late), 2) if late else None,
            "sleep_late_s_median": round(sorted(late)[len(late) // 2], 2) if late else None,
            "signals_sent": 2 * runs, "processes_alive": coord.alive(), "prefix": env.prefix,
        })
        return result
