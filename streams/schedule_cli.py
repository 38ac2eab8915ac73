"""``legato schedule``: create, list, show, pause, resume, delete, trigger and backfill schedules on
``<prefix>.schedules`` (docs/schedules.md). The coordinators fire them; these commands only write records."""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from legato.streams import security
from legato.streams.admin import ensure_topics
from legato.streams.kafka_io import keyed_partitioner
from legato.streams.schedules import ScheduleTable, fired_key, read_table
from legato.topics import codec
from legato.topics.models import RunRequested
from legato.workflows.durations import parse_duration
from legato.workflows.schedule import (Overlap, ScheduleError, ScheduleSpec, iso, manual_run_id, next_tick, parse_every, run_id, ticks_between,
                                       tz_of)

SUBCOMMANDS = ("create", "list", "show", "pause", "resume", "delete", "trigger", "backfill")


class _Refused(Exception):
    """A command that cannot be carried out; the message says why."""


def add_parser(sub: Any, defaults: dict[str, Any]) -> None:
    """Register ``legato schedule …`` on the CLI's subparsers."""
    p = sub.add_parser("schedule", help="start runs on a cron or interval (schedules on <prefix>.schedules, fired by the coordinators)")
    cmds = p.add_subparsers(dest="schedule_command", required=True)
    c = cmds.add_parser("create", help="create a schedule: --cron or --every")
    c.add_argument("name")
    c.add_argument("--workflow", required=True, help="the workflow each tick starts a run of")
    rule = c.add_mutually_exclusive_group(required=True)
    rule.add_argument("--cron", help='five fields: minute hour day-of-month month day-of-week, e.g. "0 9 * * MON-FRI"')
    rule.add_argument("--every", help="an interval, e.g. 15m (at least 1s), counted from the schedule's creation")
    c.add_argument("--timezone", default="UTC", help="IANA timezone of the cron's wall-clock times (default UTC)")
    c.add_argument("--input", default="{}", help="JSON object: every run's input")
    c.add_argument("--overlap", choices=["skip", "buffer_one", "allow"], default="allow", help="what a tick does while the previous run is going")
    c.add_argument("--catchup", default="1h", help="ticks missed while no coordinator ran are fired if not older than this (default 1h)")
    c.add_argument("--jitter", default="0s", help="delay each tick by a fixed amount in [0, jitter) derived from the name and the tick")
    for name, text in [("list", "the schedules with their last and next ticks"), ("show", "one schedule, its state and its next ticks"),
                       ("pause", "stop firing (ticks while paused never fire)"), ("resume", "fire again from the next tick"),
                       ("delete", "delete a schedule (its runs go on)"), ("trigger", "start one run now, outside the schedule's ticks"),
                       ("backfill", "start the runs of the ticks in [--from, --to] (the same run_ids as the ticks': a tick already fired is not run again)")]:
        c = cmds.add_parser(name, help=text)
        if name != "list":
            c.add_argument("name")
        if name == "backfill":
            c.add_argument("--from", dest="start", required=True, help="ISO 8601 time; without an offset, in the schedule's timezone")
            c.add_argument("--to", dest="end", required=True, help="ISO 8601 time; without an offset, in the schedule's timezone")
    p.set_defaults(**defaults)


def run(args: argparse.Namespace, bootstrap: str, topics: Any, partitions: int) -> int:
    try:
        return asyncio.run(_run(args, bootstrap, topics, partitions))
    except _Refused as exc:
        print(f"legato schedule {args.schedule_command}: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, bootstrap: str, topics: Any, partitions: int) -> int:
    cmd = args.schedule_command
    if cmd == "create":
        spec = _spec(args)
        try:
            await ensure_topics(bootstrap, topics, [], partitions)
        except Exception as exc:  # a principal without CREATE: the operator's administrator created them
            print(f"legato schedule create: topics not checked ({exc})", file=sys.stderr)
    table = await read_table(bootstrap, topics)
    if cmd == "list":
        _print_list(table)
        return 0
    if cmd == "create":
        if spec.name in table.specs:
            raise _Refused(f"schedule {spec.name!r} exists (delete it first)")
        await _send(bootstrap, [(topics.schedules, spec.name.encode(), codec.dumps(spec))])
        print(f"{spec.name}: next tick {iso(next_tick(spec, int(time.time() * 1000)))}")
        return 0
    spec = table.specs.get(args.name)
    if spec is None:
        raise _Refused(f"no schedule {args.name!r} on {topics.schedules}")
    now_ms = int(time.time() * 1000)
    if cmd == "show":
        print(orjson.dumps(view(spec, table, now_ms, upcoming=5), option=orjson.OPT_INDENT_2).decode())
    elif cmd in ("pause", "resume"):
        changed = spec.model_copy(update={"paused": cmd == "pause", **({"resumed_ms": now_ms} if cmd == "resume" else {})})
        await _send(bootstrap, [(topics.schedules, spec.name.encode(), codec.dumps(changed))])
        print(f"{spec.name}: {'paused' if cmd == 'pause' else 'resumed'}")
    elif cmd == "delete":
        await _send(bootstrap, [(topics.schedules, fired_key(spec.name), None), (topics.schedules, spec.name.encode(), None)])
        print(f"{spec.name}: deleted")
    elif cmd == "trigger":
        rid = manual_run_id(spec.name, now_ms)
        await _send(bootstrap, [_trigger(topics, spec, rid)])
        print(rid)
    elif cmd == "backfill":
        start, end = _instant(args.start, spec, "--from"), _instant(args.end, spec, "--to")
        if end < start:
            raise _Refused("--to is before --from")
        try:
            ticks = ticks_between(spec.model_copy(update={"created_ms": min(spec.created_ms, start)}), start - 1, end, limit=10_000)
        except ScheduleError as exc:
            raise _Refused(str(exc)) from None
        await _send(bootstrap, [_trigger(topics, spec, run_id(spec.name, t)) for t in ticks])
        for t in ticks:
            print(run_id(spec.name, t))
        print(f"{spec.name}: {len(ticks)} runs requested", file=sys.stderr)
    return 0


def _spec(args: argparse.Namespace) -> ScheduleSpec:
    try:
        payload = orjson.loads(args.input)
    except orjson.JSONDecodeError as exc:
        raise _Refused(f"--input is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _Refused("--input must be a JSON object")
    try:
        catchup, jitter = parse_duration(args.catchup), parse_duration(args.jitter)
        every = parse_every(args.every) if args.every else None
    except ValueError as exc:
        raise _Refused(str(exc)) from None
    overlap: Overlap = args.overlap
    try:
        return ScheduleSpec(name=args.name, workflow=args.workflow, cron=args.cron, every_ms=every, timezone=args.timezone, input=payload,
                            overlap=overlap, catchup_ms=int(catchup * 1000), jitter_ms=int(jitter * 1000), created_ms=int(time.time() * 1000))
    except (ValidationError, ScheduleError) as exc:
        raise _Refused(_reason(exc)) from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'schedule'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
    return str(exc)


def _instant(text: str, spec: ScheduleSpec, flag: str) -> int:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _Refused(f"{flag} {text!r} is not an ISO 8601 time (e.g. 2026-12-01T09:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz_of(spec))
    return int(moment.timestamp() * 1000)


def _trigger(topics: Any, spec: ScheduleSpec, rid: str) -> tuple[str, bytes, bytes]:
    record = RunRequested(workflow=spec.workflow, input=spec.input, run_id=rid, correlation_id=f"schedule:{spec.name}")
    return topics.triggers, rid.encode(), codec.dumps(record)


async def _send(bootstrap: str, records: list[tuple[str, bytes, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, partitioner=keyed_partitioner, **security.aiokafka_kwargs())
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for topic, key, value in records]
        for f in futures:
            await f
    finally:
        await producer.stop()


def view(spec: ScheduleSpec, table: ScheduleTable, now_ms: int, upcoming: int = 1) -> dict[str, Any]:
    """A schedule as the CLI and the console show it."""
    fired = table.fired.get(spec.name)
    if fired is not None and fired.created_ms != spec.created_ms:
        fired = None
    ticks: list[int] = []
    t = now_ms
    for _ in range(upcoming):
        t = next_tick(spec, t)
        ticks.append(t)
    return {
        "name": spec.name, "workflow": spec.workflow, "rule": f"cron {spec.cron}" if spec.cron else f"every {spec.every_ms / 1000:g}s",
        "timezone": spec.timezone, "overlap": spec.overlap, "catchup_s": spec.catchup_ms / 1000, "jitter_s": spec.jitter_ms / 1000,
        "input": spec.input, "paused": spec.paused, "created": iso(spec.created_ms),
        "last_tick": iso(fired.last_tick_ms) if fired is not None and fired.last_tick_ms >= spec.created_ms else None,
        "last_run_id": fired.last_run_id if fired is not None else None,
        "buffered_tick": iso(fired.buffered_tick_ms) if fired is not None and fired.buffered_tick_ms is not None else None,
        "next_ticks": [iso(x) for x in ticks],
    }


def _print_list(table: ScheduleTable) -> None:
    now_ms = int(time.time() * 1000)
    header = ("NAME", "WORKFLOW", "RULE", "TIMEZONE", "OVERLAP", "STATE", "LAST_TICK", "NEXT_TICK", "LAST_RUN")
    rows = []
    for name in sorted(table.specs):
        v = view(table.specs[name], table, now_ms, 1)
        rows.append((v["name"], v["workflow"], v["rule"], v["timezone"], v["overlap"], "paused" if v["paused"] else "active",
                     v["last_tick"] or "-", "-" if v["paused"] else v["next_ticks"][0], v["last_run_id"] or "-"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
