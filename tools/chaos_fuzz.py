"""The ``fuzz`` chaos scenario: generated bad messages on triggers and completions, interleaved with valid runs."""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import orjson

from legato.streams import ast_gc
from legato.tools.harness import Env, Scene, free_port, judge, metric_sum, mix_expected, scrape, trigger, wait_ready


@dataclass
class Bad:
    topic: str  # "triggers" | "completions"
    category: str
    key: bytes | None
    value: bytes | None
    expect: str  # "dlq" | "ignored" | "failed_run" | "refused" (by the broker)


def bad_message_strategy(known_runs: list[str]):
    """A hypothesis strategy of bad messages for ``legato.triggers`` and ``legato.completions``."""
    from hypothesis import strategies as st

    text = st.text(max_size=40)
    ints = st.integers(-(2**53), 2**53)  # JSON numbers orjson can write
    json_scalar = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False, allow_infinity=False), text)
    json_any = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=10)
    not_object = json_any.filter(lambda v: not isinstance(v, dict))
    key = st.one_of(st.none(), st.binary(max_size=16), st.text(max_size=16).map(str.encode),
                    st.binary(min_size=1, max_size=16).map(lambda b: b"\xff" + b))  # \xff is never UTF-8
    run_id = st.one_of(st.sampled_from(known_runs or ["x"]), st.uuids().map(str))
    good_completion = st.fixed_dictionaries({
        "request_id": text, "run_id": run_id, "step_id": text, "attempt": st.integers(1, 10**6),
        "status": st.sampled_from(["succeeded", "failed"]), "output": json_any})

    def b(v: Any) -> bytes:
        return orjson.dumps(v)

    def deep(depth: int) -> bytes:
        return b'{"workflow":"chaos_mix","input":{"n":' + b"[" * depth + b"1" + b"]" * depth + b"}}"

    strategies = [
        # triggers
        st.builds(lambda k, v: Bad("triggers", "random bytes", k, b"\xff" + v, "dlq"), key, st.binary(max_size=64)),
        st.builds(lambda k, v: Bad("triggers", "non-JSON text", k, ("{" + v).encode(), "dlq"), key, text),
        st.builds(lambda k, v: Bad("triggers", "JSON, not an object", k, b(v), "dlq"), key, not_object),
        st.builds(lambda k, w, i: Bad("triggers", "wrong types", k, b({"workflow": w, "input": i}), "dlq"), key,
                  st.one_of(ints, st.none(), st.lists(ints, max_size=2), st.just("")), st.one_of(ints, text, st.lists(ints))),
        st.builds(lambda k, v: Bad("triggers", "missing fields", k, b(v), "dlq"), key,
                  st.dictionaries(st.sampled_from(["input", "run_id", "correlation_id", "flow"]), st.dictionaries(text, json_scalar, max_size=2), max_size=3)),
        st.builds(lambda k, w, i: Bad("triggers", "unknown workflow", k, b({"workflow": "nope_" + w, "input": i}), "failed_run"), key,
                  st.from_regex(r"[a-z0-9_]{1,20}", fullmatch=True), st.dictionaries(text, json_scalar, max_size=3)),
        st.builds(lambda k: Bad("triggers", "empty value (null)", k or b"k", None, "dlq"), key),  # a record needs a key or a value
        st.builds(lambda d: Bad("triggers", "deeply nested JSON", None, deep(d), "dlq"), st.integers(1100, 5000)),
        st.builds(lambda k: Bad("triggers", "non-UTF-8 key", k, b"\xfe\xfe not json", "dlq"), st.binary(min_size=1, max_size=8).map(lambda x: b"\xff" + x)),
        # completions
        st.builds(lambda k, v: Bad("completions", "random bytes", k, b"\xff" + v, "dlq"), key, st.binary(max_size=64)),
        st.builds(lambda k, v: Bad("completions", "non-JSON text", k, ("[" + v).encode(), "dlq"), key, text),
        st.builds(lambda k, v: Bad("completions", "JSON, not an object", k, b(v), "dlq"), key, not_object),
        st.builds(lambda c, f, v: Bad("completions", "wrong types", c["run_id"].encode(), b({**c, f: v}), "dlq"), good_completion,
                  st.sampled_from(["attempt", "status", "request_id", "run_id"]), st.one_of(st.none(), st.lists(ints, max_size=2), st.just(-1), st.just({"a": 1}))),
        st.builds(lambda c, f: Bad("completions", "missing fields", c["run_id"].encode(), b({k: v for k, v in c.items() if k != f}), "dlq"),
                  good_completion, st.sampled_from(["request_id", "run_id", "step_id", "status"])),
        st.builds(lambda c: Bad("completions", "unknown run", str(uuid.UUID(int=abs(hash(c["request_id"])) % 2**128)).encode(),
                                None, "ignored"), good_completion),
        st.builds(lambda c: Bad("completions", "unknown request / stale attempt", c["run_id"].encode(), b(c), "ignored"),
                  good_completion.filter(lambda c: c["run_id"] in known_runs) if known_runs else good_completion),
        st.builds(lambda d: Bad("completions", "deeply nested JSON", None, b'{"request_id":' + b"[" * d + b"]" * d + b"}", "dlq"), st.integers(1100, 5000)),
        st.builds(lambda c: Bad("completions", "non-UTF-8 key", b"\xff\xfe" + c["run_id"].encode(), b"\xff garbage", "dlq"), good_completion),
    ]
    return st.one_of(strategies)


def finish_bad(bad: Bad) -> Bad:
    """Fill in what a strategy could not build lazily (unknown-run completions get a value keyed by their key)."""
    if bad.category == "unknown run" and bad.value is None:
        rid = bad.key.decode()
        bad.value = orjson.dumps({"request_id": f"{rid}/x/1", "run_id": rid, "step_id": "x", "attempt": 1, "status": "succeeded", "output": 1})
    return bad


def oversize(topic: str) -> Bad:
    return Bad(topic, "payload over the size limit", b"big", b'{"workflow":"chaos_mix","input":{"pad":"' + b"x" * (1024 * 1024 + 64) + b'"}}', "refused")


def blowups() -> list[Bad]:
    """Messages under the broker's limit whose dead letter is over it (JSON escaping / base64 expansion)."""
    return [Bad("triggers", "dead letter over the limit (control chars)", b"esc", b"\x01" * 200_000, "dlq"),
            Bad("completions", "dead letter over the limit (non-UTF-8)", b"b64", b"\xff" * 900_000, "dlq")]


def generate_bad(count: int, known_runs: list[str], seed: int = 0) -> list[Bad]:
    """``count`` bad messages drawn by hypothesis (deterministically for a seed)."""
    from hypothesis import HealthCheck, Phase, given, seed as hseed, settings

    ast_gc.install()  # hypothesis parses lambdas' source; CPython 3.11 fails that if a finalizer parses meanwhile
    out: list[Bad] = []

    @hseed(seed)
    @settings(max_examples=count, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(bad_message_strategy(known_runs))
    def collect(bad: Bad) -> None:
        out.append(finish_bad(bad))

    while len(out) < count:
        collect()
    return out[:count]


async def _generate_apart(count: int, known_runs: list[str], seed: int) -> list[Bad]:
    """``generate_bad`` in a process of its own: hypothesis checks that nothing touches the global ``random`` while it
    draws, and this process's Kafka clients do (aiokafka picks nodes with it), so drawing on a thread beside the
    event loop drew its "Do not use the random module inside strategies" warning. Apart, it also leaves the loop
    its GIL."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, generate_bad, count, known_runs, seed)


async def scenario_fuzz(bootstrap: str, bad: int = 10_000, valid: int = 500, seed: int = 0, extra_env: dict[str, str] | None = None,
                        timeout: float = 900.0, with_blowups: bool = True, say: Callable[[str], None] = print, workdir: Path | None = None) -> dict[str, Any]:
    """``bad`` generated bad messages interleaved with ``valid`` chaos_mix runs and three misbehaving handlers."""
    port = free_port()
    env = Env(bootstrap, workdir, extra_env=extra_env)
    async with Scene(env, [env.topics.dlq]) as scene:
        coord = env.process("coordinator", env={"LEGATO_METRICS_PORT": str(port)})
        worker = env.process("worker")
        watch, dlq, prod = scene.watch, scene.other, scene.prod
        await wait_ready(env, prod, watch, [coord, worker])
        base = scrape(port)
        expected = {f"fz-{i}": mix_expected(i) for i in range(valid)}
        ids = list(expected)
        t_gen = time.monotonic()
        msgs = await _generate_apart(bad, ids, seed)
        say(f"  generated {len(msgs)} bad messages in {time.monotonic() - t_gen:.1f}s")
        msgs += [oversize("triggers"), oversize("completions")] + (blowups() if with_blowups else [])
        rnd = random.Random(seed)
        plan: list[tuple[str, Any]] = [("bad", m) for m in msgs] + [("valid", i) for i in range(valid)]
        rnd.shuffle(plan)
        # valid runs first in their own order so their run_ids exist when bad completions name them
        refused: Counter = Counter()
        sent_bad: list[Bad] = []
        futures = []
        for n, (kind, item) in enumerate(plan):
            if kind == "valid":
                await trigger(prod, env, "chaos_mix", {"n": item}, ids[item])
            else:
                topic = env.topics.triggers if item.topic == "triggers" else env.topics.completions
                try:
                    futures.append(await prod.send(topic, item.value, key=item.key))
                    sent_bad.append(item)
                except Exception as exc:  # refused by the client or broker (size)
                    refused[f"{item.category}: {type(exc).__name__}"] += 1
            if n % 500 == 499:
                await prod.flush()
                await asyncio.sleep(0.2)  # bounded rate
        for f in futures:
            try:
                await f
            except Exception as exc:
                refused[type(exc).__name__] += 1
        finished = await watch.wait(set(ids), timeout, progress=say)
        # misbehaving handlers: each fails only its own run, with a clear error
        handler_runs = {}
        for wf in ("chaos_raise", "chaos_hang", "chaos_unserializable"):
            rid = f"{wf}-{uuid.uuid4().hex[:6]}"
            handler_runs[rid] = wf
            await trigger(prod, env, wf, {}, rid)
        await prod.flush()
        await watch.wait(set(handler_runs), 120)
        expected_dlq = sum(1 for m in sent_bad if m.expect == "dlq")
        expected_failed = sum(1 for m in sent_bad if m.expect == "failed_run")
        expected_ignored = sum(1 for m in sent_bad if m.expect == "ignored")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(dlq.records) < expected_dlq:
            await asyncio.sleep(0.5)
        await asyncio.sleep(3.0)
        after = scrape(port)
        ign = lambda s: metric_sum(s, "legato_events_ignored_total", lambda k: "rekeyed" not in k and "replayed" not in k)
        ignored_by_reason = {k.split('"')[1]: after[k] - base.get(k, 0) for k in after if k.startswith("legato_events_ignored_total{")}
        reasons: Counter = Counter()
        for r in dlq.records:
            v = r.json()
            reasons[(v.get("source_topic", "?").split(".")[-1], (v.get("reason") or "<none>").split(":")[0])] += 1
        no_reason = sum(1 for r in dlq.records if not (r.json() or {}).get("reason"))
        failed_unknown = sum(1 for rid, evs in watch.terminal.items()
                             if not rid.startswith(("fz-", "probe-", "chaos_")) and evs[0].get("error", {}).get("type") == "UnknownWorkflow")
        from legato.topics.codec import payload_text

        in_dlq = Counter((v.get("source_topic", "").rsplit(".", 1)[-1], v.get("payload")) for v in (r.json() or {} for r in dlq.records))
        missing: Counter = Counter()
        for m in sent_bad:
            if m.expect == "dlq":
                k = (m.topic, payload_text(m.value))
                if in_dlq[k] > 0:
                    in_dlq[k] -= 1
                else:
                    missing[f"{m.topic}/{m.category}"] += 1
        res = judge(expected, watch, [], [])
        res["dlq_missing_by_category"] = dict(missing)
        by_cat: Counter = Counter((m.topic, m.category, m.expect) for m in sent_bad)
        res.update({
            "scenario": "fuzz", "bad_generated": len(msgs), "bad_sent": len(sent_bad), "refused_at_produce": dict(refused),
            "expected_dlq": expected_dlq, "dlq_records": len(dlq.records), "dlq_without_reason": no_reason,
            "dlq_by_reason": {f"{t}/{r}": n for (t, r), n in sorted(reasons.items())},
            "expected_ignored": expected_ignored, "ignored_counted": ign(after) - ign(base), "ignored_by_reason": {k: v for k, v in ignored_by_reason.items() if v},
            "expected_unknown_workflow_runs": expected_failed, "unknown_workflow_runs_failed": failed_unknown,
            "by_category": {f"{t}/{c} -> {e}": n for (t, c, e), n in sorted(by_cat.items())},
            "handler_runs": {wf: (watch.terminal[rid][0]["status"], (watch.terminal[rid][0].get("error") or {}).get("type"),
                                  (watch.terminal[rid][0].get("error") or {}).get("message", "")[:120]) if rid in watch.terminal else None
                             for rid, wf in handler_runs.items()},
            "all_finished": finished, "processes_alive": coord.alive() and worker.alive(),
            "coordinator_restarts": coord.starts - 1, "prefix": env.prefix,
        })
        return res


# --------------------------------------------------------------------------- report
