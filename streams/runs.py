"""A run read back from the coordinator's changelog, as a table or a Mermaid gantt: ``legato runs show``, ``runs list``,
``redrive --wait`` and ``fork --wait`` read runs through here."""
from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Iterator

import yaml

from aiokafka import TopicPartition

from legato.streams import kafka_io, security
from legato.topics.limits import RUN_LIMIT_PREFIX
from legato.topics.names import Topics
from legato.topics.payload_refs import refs_in
from legato.workflows.state import RunState, StepState

TERMINAL_STEP = ("succeeded", "failed", "timed_out", "cancelled", "skipped")
_KEY_NAME = re.compile(r"^\s*\$\{\s*(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*)\s*\}\s*$")


FIRST_WINDOW = 2_000
"""Records in the first window read back from the end of a changelog partition; each further window is twice the
one before, so a run written long ago costs a few reads, and an unknown run one read of the whole partition."""


def windows(start: int, end: int, first: int = FIRST_WINDOW) -> Iterator[tuple[int, int]]:
    """The offset windows ``[lo, hi)`` from ``end`` back to ``start``, newest first, each twice the size of the one
    before: together they cover ``[start, end)`` once."""
    hi, size = end, first
    while hi > start:
        lo = max(start, hi - size)
        yield lo, hi
        hi, size = lo, size * 2


async def last_of_key(read: Callable[[int, int, Callable[[Any], None]], Awaitable[None]], start: int, end: int, key: bytes,
                      first: int = FIRST_WINDOW) -> Any | None:
    """The last record of ``key`` among the offsets ``[start, end)``, or None when the key has none.

    ``read(lo, hi, on_record)`` calls ``on_record`` for each record from ``lo`` (it may go on past ``hi``: those
    records belong to a newer window, already read). Windows are read newest first, and the first that holds the key
    holds its last record, so reading stops there.
    """
    for lo, hi in windows(start, end, first):
        last = None

        def keep(record: Any, hi: int = hi) -> None:
            nonlocal last
            if record.key == key and record.offset < hi:
                last = record

        await read(lo, hi, keep)
        if last is not None:
            return last
    return None


async def load_run(bootstrap: str, prefix: str, run_id: str, timeout: float = 30.0) -> RunState | None:
    """The last state of ``run_id`` in the changelog, or None when the run is unknown (or was deleted).

    Reads only the key's partition (murmur2 like aiokafka's default partitioner), back from the end offset seen
    when reading starts, in windows (:func:`last_of_key`), until the window holding the run's last record.
    """
    topic = Topics(prefix).changelog
    key = run_id.encode()
    consumer = kafka_io.reader(bootstrap, **security.aiokafka_kwargs())
    try:
        await consumer.start()
        partitions = await kafka_io.partitions_of(consumer, topic)
        if not partitions:
            return None
        tp = TopicPartition(topic, kafka_io.partition_for(key, len(partitions)))
        start, end = await kafka_io.offsets_of(consumer, tp)
        deadline = asyncio.get_running_loop().time() + timeout

        async def read(lo: int, hi: int, on_record: Callable[[Any], None]) -> None:
            await kafka_io.read_range(consumer, tp, lo, hi, on_record, deadline=deadline)

        record = await last_of_key(read, start, end, key, first=FIRST_WINDOW)
    finally:
        await consumer.stop()
    if record is None or record.value is None:  # never written, or a tombstone
        return None
    return RunState.model_validate_json(record.value)


# --- waiting for a limit -------------------------------------------------------------------------------


def limit_key_names(source: str | None) -> dict[str, str]:
    """Step id → what its ``limit_key`` names, from a definition's YAML: ``tenant`` for ``"${ input.tenant }"``
    (a key of another shape has no name). Empty when the source is missing or unreadable."""
    try:
        doc = yaml.safe_load(source) if source else None
    except yaml.YAMLError:
        return {}
    names: dict[str, str] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            key = node.get("limit_key")
            if isinstance(node.get("id"), str) and isinstance(key, str) and (match := _KEY_NAME.match(key)):
                names[node["id"]] = match.group(1)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    return names


def limit_wait(hold: dict[str, Any] | None, key_name: str | None = None) -> str | None:
    """What a step or run waits for while its acquisition of a limit is not granted (``limit_hold``), or None:
    ``waiting for limit openai (tenant acme)``, ``waiting for concurrency key customer-1``."""
    if not isinstance(hold, dict) or not hold.get("waiting"):
        return None
    limit, key = str(hold.get("limit") or "?"), str(hold.get("key") or "")
    if limit.startswith(RUN_LIMIT_PREFIX):
        return f"waiting for concurrency key {key}" if key else "waiting for its concurrency limit"
    if not key:
        return f"waiting for limit {limit}"
    return f"waiting for limit {limit} ({key_name} {key})" if key_name else f"waiting for limit {limit} ({key})"


# --- rendering ---------------------------------------------------------------------------------------


def _ms(value: int | None) -> str:
    return "-" if value is None else str(value)


def _cost(cost: dict[str, Any] | None) -> str:
    if not cost:
        return "-"
    parts = []
    if "usd" in cost:
        parts.append(f"${cost['usd']:.4f}")
    tokens = (cost.get("tokens_in") or 0) + (cost.get("tokens_out") or 0)
    if tokens:
        parts.append(f"{tokens} tok")
    models = sorted(cost.get("models") or ([cost["model"]] if cost.get("model") else []))
    if models:
        parts.append(",".join(map(str, models)))
    return " ".join(parts) or "-"


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def value_size(value: Any) -> str:
    """A value's size as ``runs show`` and the console print it: its JSON's bytes, or, when it holds payload
    references (claim checks), the bytes stored by reference (``legato runs show RUN --fetch STEP`` prints it)."""
    if value is None:
        return "-"
    refs = refs_in(value)
    if refs:
        return f"{_bytes(sum(r.size for r in refs))} by ref"
    return _bytes(len(json.dumps(value, separators=(",", ":"), default=str).encode()))


def find_step(state: RunState, name: str) -> StepState | None:
    """The step of key ``name``, else the first started of id ``name`` (``--fetch``)."""
    return state.steps.get(name) or next((s for s in _ordered(state) if s.step_id == name), None)


def _iterations(step: StepState) -> str:
    if step.kind == "loop":
        ended = f" ({step.ended_by})" if step.ended_by else ""
        return f"{(step.iteration or 0) + 1}{ended}"
    return "-" if step.iteration is None else f"#{step.iteration}"


def _ordered(state: RunState) -> list[StepState]:
    """Steps in the order they started (ties: insertion order, which is decision order)."""
    return [s for _, s in sorted(enumerate(state.steps.values()), key=lambda p: (p[1].started_ms, p[0]))]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _step_status(step: StepState, key_names: dict[str, str]) -> str:
    waits = limit_wait(step.limit_hold, key_names.get(step.step_id or ""))
    if waits is not None:
        return waits
    return f"{step.status} ({step.signal})" if step.status == "waiting" and step.signal else step.status


def render_table(state: RunState, key_names: dict[str, str] | None = None) -> str:
    """Each step's kind, status (or what it waits for), attempts, start offset and duration (ms), path, iterations and
    cost; then totals. ``key_names``: what each step's ``limit_key`` names (:func:`limit_key_names`)."""
    key_names = key_names or {}
    rows = []
    for step in _ordered(state):
        duration = None if step.finished_ms is None else step.finished_ms - step.started_ms
        rows.append([
            step.key,
            step.kind,
            _step_status(step, key_names),
            str(step.attempt) if step.kind == "activity" else "-",
            _ms(step.started_ms - state.started_ms),
            _ms(duration),
            step.path or "-",
            _iterations(step),
            _cost(step.cost),
            value_size(step.output),
        ])
    header = f"run {state.run_id}  workflow {state.workflow} v{state.version}  status {state.status}"
    run_waits = limit_wait(state.limit_hold)
    if run_waits is not None:
        header += f" ({run_waits})"
    if state.priority is not None:
        header += f"  priority {state.priority}"
    body = _table(["step", "kind", "status", "attempt", "start_ms", "duration_ms", "path", "iterations", "cost", "output"], rows)
    duration = None if state.finished_ms is None else state.finished_ms - state.started_ms
    totals = [
        f"started   {_iso(state.started_ms)}",
        f"finished  {_iso(state.finished_ms)}",
        f"duration  {_ms(duration)} ms",
        f"path      {' → '.join(state.path) if state.path else '-'}",
        f"cost      {_cost(state.cost)}",
    ]
    models = (state.cost or {}).get("models") or {}
    if models:
        totals.append("by model  " + ", ".join(f"{m} ${usd:.4f}" for m, usd in sorted(models.items())))
    if state.error is not None:
        totals.append(f"error     {state.error.type}: {state.error.message}")
    if state.output is not None:
        totals.append(f"output    ({value_size(state.output)}) {json.dumps(state.output, sort_keys=True, default=str)[:500]}")
    return "\n".join([header, "", body, "", *totals])


def _task_name(text: str) -> str:
    # ':' and '#' have meaning in gantt task lines
    return text.replace(":", "﹕").replace("#", " iteration ").replace(";", ",")


def render_gantt(state: RunState) -> str:
    """A Mermaid gantt chart: one task per step from its start to its end (ms); parallel branches overlap.

    Sections group steps by their top-level step, so branches and iterations sit under what started them.
    A step without an end (the run is still going) ends at the run's end, or at its start.
    """
    end_of_run = state.finished_ms
    lines = [
        "gantt",
        f"    title {state.workflow} run {state.run_id} ({state.status})",
        "    dateFormat x",
        "    axisFormat %M:%S.%L",
    ]
    section = None
    for i, step in enumerate(_ordered(state)):
        top = step.key.split("/", 1)[0].split("#", 1)[0]
        if top != section:
            section = top
            lines.append(f"    section {_task_name(top)}")
        end = step.finished_ms if step.finished_ms is not None else (end_of_run if end_of_run is not None else step.started_ms)
        end = max(end, step.started_ms + 1)  # mermaid drops zero-length tasks
        tag = {"failed": "crit, ", "timed_out": "crit, ", "running": "active, ", "cancelled": "done, ", "skipped": "done, "}.get(step.status, "")
        label = f"{step.key} ({step.kind}, {step.status})"
        lines.append(f"    {_task_name(label)} :{tag}s{i}, {step.started_ms}, {end}")
    return "\n".join(lines) + "\n"


# --- the run index (legato runs list / show) ----------------------------------------------------------


def state_of(run: dict[str, Any]) -> RunState | None:
    """The run's state from an index row, or None when no readable changelog document was indexed."""
    if not run.get("state"):
        return None
    try:
        return RunState.model_validate(run["state"])
    except ValueError:
        return None


def render_list(rows: list[dict[str, Any]], counts: dict[str, int]) -> str:
    """The runs list: one line per run, newest first, then the counts by status."""
    table = _table(["run_id", "workflow", "status", "started", "duration_ms", "correlation_id"], [
        [r["run_id"], f"{r['workflow'] or '?'}@{r['version'] if r['version'] is not None else '?'}", r["status"] or "-", _iso(r["started_ms"]),
         _ms(None if r["finished_ms"] is None or r["started_ms"] is None else r["finished_ms"] - r["started_ms"]), r["correlation_id"] or "-"]
        for r in rows])
    total = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no runs"
    return f"{table}\n\n{total}"


def render_run(run: dict[str, Any], definition: str | None = None) -> str:
    """A run from the index: the step table (when the changelog has it) or what the runs topic said. ``definition``:
    the YAML of the run's workflow version, when known (it names the limit keys)."""
    state = state_of(run)
    if state is not None:
        return render_table(state, limit_key_names(definition))
    summary = run.get("summary") or {}
    lines = [f"run {run['run_id']}  workflow {run['workflow']} v{run['version'] if run['version'] is not None else '?'}  status {run['status']}", "",
             f"started   {_iso(run['started_ms'])}", f"finished  {_iso(run['finished_ms'])}"]
    if summary.get("error"):
        lines.append(f"error     {summary['error'].get('type')}: {summary['error'].get('message')}")
    if "output" in summary:
        lines.append(f"output    {json.dumps(summary['output'], sort_keys=True, default=str)[:500]}")
    return "\n".join(lines)


def render_history(events: list[dict[str, Any]]) -> str:
    """The run's events with where they are in the log (topic/partition/offset)."""
    rows = [[_iso(e["at_ms"]), e["kind"], e["step"] or "-", f"{e['topic']}/{e['partition']}/{e['offset']}"] for e in events]
    return _table(["time", "event", "step", "topic/partition/offset"], rows)
