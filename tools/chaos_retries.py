"""``legato chaos retries``: step timeouts and retries under coordinator kills, answered by an independent worker.

N ``chaos_retry`` runs (an activity, a ``parallel`` of two branches, one of them two activities, then a ``choice``)
are triggered in one burst, with bad records mixed in, while the coordinator is SIGKILLed K times (restarted after
``down_s``). Their activities are served only by ``chaos_data/independent_worker.py`` (confluent-kafka, the topic
contract alone, no deduplication), which never answers the first attempt of ``kyc`` for one run in six: that step
times out (``timeout: 1s``) and is retried. Every other request is answered within milliseconds, so no run may fail:
a failed run whose worker answered one of its requests before that request's deadline is counted as
``failed_answered_in_time`` (``chaos.answered_in_time``; the guarantee is that it stays 0).
"""
from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import orjson

from legato.tools.harness import ANSWERED_ELSEWHERE, DATA, Env, Proc, Scene, answered_in_time, free_port, judge, scrape, wait_ready

WORKFLOW = "chaos_retry"
ACTIVITIES = [a for a in ANSWERED_ELSEWHERE if a.startswith("retry_")]


class ScriptProc(Proc):
    """A Python script of ``chaos_data`` run as its own process (not a ``legato`` command)."""

    def start(self) -> None:
        self.starts += 1
        with open(self.cwd / f"{self.name}.log", "ab") as out:
            self.proc = subprocess.Popen([sys.executable, *self.args], cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)


def _bad_records(count: int, rnd: random.Random) -> list[tuple[str, bytes | None, bytes]]:
    """Malformed completions and triggers: each must go to the DLQ (or be ignored) without disturbing the runs."""
    shapes = [b"not json", b"{", b"[]", b'{"request_id": 7}', b'{"run_id": "x", "status": "maybe"}', b"\xff\xfe", b'"a string"',
              orjson.dumps({"request_id": "nope/kyc/1", "run_id": "nope", "step_id": "kyc", "attempt": 0, "status": "succeeded"})]
    out = []
    for i in range(count):
        topic = "completions" if i % 2 == 0 else "triggers"
        out.append((topic, f"bad-{i}".encode() if rnd.random() < 0.5 else None, rnd.choice(shapes)))
    return out


async def scenario_retries(bootstrap: str, runs: int = 300, kills: int = 3, down_s: float = 1.0, bad: int = 100, seed: int = 1,
                           extra_env: dict[str, str] | None = None, timeout: float = 900.0, say: Callable[[str], None] = print,
                           workdir: Path | None = None) -> dict[str, Any]:
    """``runs`` chaos_retry runs in one burst, ``bad`` bad records among them, the coordinator SIGKILLed ``kills`` times."""
    rnd = random.Random(seed)
    env = Env(bootstrap, workdir, extra_env=extra_env)
    t0 = time.time()
    requests = [env.topics.requests(a) for a in ACTIVITIES]
    kill_log: list[dict[str, Any]] = []
    ignored: Counter = Counter()
    async with Scene(env, [env.topics.completions, *requests]) as scene:
        port = free_port()
        coord = env.process("coordinator", env={"LEGATO_METRICS_PORT": str(port), "LEGATO_TRACE_FILE": str(env.workdir / "trace.jsonl")})
        worker = env.process("worker")  # serves chaos_probe's chaos_echo only
        independent = ScriptProc("independent", [str(DATA / "independent_worker.py"), bootstrap, env.prefix], env.env, env.workdir)
        independent.start()
        env.procs.append(independent)
        watch, prod = scene.watch, scene.prod
        ready = await wait_ready(env, prod, watch, [coord, worker, independent])
        say(f"  processes ready after {ready:.1f}s (prefix {env.prefix}, logs {env.workdir})")
        ids = [f"retry-{i}" for i in range(runs)]

        def count_ignored() -> None:
            try:
                samples = scrape(port)
            except Exception:
                return
            for k, v in samples.items():
                if k.startswith("legato_events_ignored_total{"):
                    ignored[k.split('reason="')[1].split('"')[0]] += v

        async def burst() -> None:
            plan: list[Any] = [("run", i) for i in range(runs)] + [("bad", b) for b in _bad_records(bad, rnd)]
            rnd.shuffle(plan)
            futures = []
            for kind, item in plan:
                if kind == "run":
                    value = orjson.dumps({"workflow": WORKFLOW, "input": {"n": item}, "run_id": ids[item]})
                    futures.append(await prod.send(env.topics.triggers, value, key=ids[item].encode()))
                else:
                    topic, key, value = item
                    futures.append(await prod.send(env.topics.completions if topic == "completions" else env.topics.triggers, value, key=key))
            for f in futures:
                await f

        async def chaos() -> None:
            progress = [0]

            def on_record(rec: Any) -> None:
                progress[0] += 1

            scene.tail.listeners.append(on_record)
            await asyncio.sleep(rnd.uniform(0.3, 1.5))
            for _ in range(kills):
                if watch.done(ids) == runs:
                    break
                # each kill lands while runs are deciding: once the restarted coordinator has taken its partitions
                # over and produced run events again, at a random moment within the next 1.5 s
                seen = progress[0]
                waited = time.monotonic()
                while progress[0] == seen and kill_log and time.monotonic() - waited < 120:
                    await asyncio.sleep(0.01)
                if kill_log:
                    await asyncio.sleep(rnd.uniform(0.0, 1.5))
                done_before = watch.done(ids)
                count_ignored()
                t_kill = coord.kill()
                await asyncio.sleep(down_s)
                coord.start()
                kill_log.append({"at_s": round(t_kill - t0, 1), "finished_before": done_before})
                say(f"  SIGKILL coordinator at +{t_kill - t0:.1f}s ({done_before}/{runs} finished), restarted after {down_s:.1f}s")

        await asyncio.gather(burst(), chaos())
        finished = await watch.wait(set(ids), timeout, progress=say)
        await asyncio.sleep(3.0)  # late duplicates
        count_ignored()
        records = scene.other.records if scene.other is not None else []
        # the worker's own records, not the copies the coordinator re-keyed from them (librdkafka's partitioner: CRC32)
        comp = [r for r in records if r.topic == env.topics.completions and r.key is not None and r.partition == zlib.crc32(r.key) % env.partitions]
        reqs = [r for r in records if r.topic != env.topics.completions]
        result = judge({rid: None for rid in ids}, watch, comp, reqs)
        failed = {rid: evs[0] for rid, evs in watch.terminal.items() if rid in set(ids) and evs[0]["status"] != "succeeded"}
        wrong = answered_in_time(set(failed), reqs, comp)
        outputs_ok = sum(1 for i, rid in enumerate(ids) if watch.terminal.get(rid) and watch.terminal[rid][0]["status"] == "succeeded"
                         and (watch.terminal[rid][0].get("output") or {}).get("n") == i)
        result.update({
            "scenario": "retries", "kills": len(kill_log), "kill_log": kill_log, "all_finished": finished,
            "failed": len(failed), "failed_examples": wrong[:3] or [
                {"run_id": r, "error": (e.get("error") or {}).get("message")} for r, e in list(failed.items())[:3]],
            "wrong_output": runs - len(failed) - outputs_ok - result["lost"], "bad_records": bad,
            "ignored_by_reason": dict(ignored), "elapsed_s": round(time.time() - t0, 1),
            "processes_alive": coord.alive() and independent.alive(), "prefix": env.prefix, "logs": str(env.workdir),
        })
        return result
