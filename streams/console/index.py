"""The run index: an SQLite view over the run-keyed topics, never a second source of truth.

``RunIndex.apply`` takes one Kafka record (topic, partition, offset, key, value, timestamp) and updates the
view; the offsets of every topic partition are stored in the same SQLite transaction as what they produced, so
a restarted process carries on where it stopped and a deleted file is rebuilt by reading from the beginning.

Sources, by topic (names from ``Topics``):
- the coordinator's changelog (compacted, key run_id): the run's state document, authoritative for status,
  version, times, input, output and steps; a tombstone (the run was forgotten) removes the run and its events;
- ``runs``: lifecycle events (a run appears even where no changelog is readable);
- ``coordinator`` (triggers re-keyed as ``run.accepted``, timers, cancel requests, child notices),
  ``requests.<activity>``, ``completions``, ``cancellations``, ``signals``, ``progress``: the run's history;
- ``definitions``: deployed workflow definitions (their YAML, for the graph).

Decoding is lenient: a record is JSON with a ``run_id`` or a changelog key; unknown fields and statuses are kept
as they are (a newer coordinator may add ``schema_version``, a ``waiting`` status or a ``signal``).
"""
from __future__ import annotations

import fcntl
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import orjson

from legato.topics.names import CHANGELOG_OFFSETS_KEY, Topics
from legato.workflows.state import RunState

STATUSES = ("running", "waiting", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
BODY_LIMIT = 64 * 1024  # an event body kept for the history page; longer ones are cut (the log keeps them whole)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (      -- small rows: what lists, filters and counts read
    run_id TEXT PRIMARY KEY,
    workflow TEXT,
    version INTEGER,
    status TEXT,
    started_ms INTEGER,
    finished_ms INTEGER,
    correlation_id TEXT,
    parent TEXT,
    cost_usd REAL,
    has_state INTEGER NOT NULL DEFAULT 0,
    updated_ms INTEGER
);
CREATE TABLE IF NOT EXISTS documents (  -- large values, read for one run at a time
    run_id TEXT PRIMARY KEY,
    state TEXT,             -- JSON: the last state document from the changelog
    state_at TEXT,          -- topic/partition/offset of that document
    summary TEXT            -- JSON: output, error, path, cost, stopped_by of the last run event
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS workflow_versions (workflow TEXT NOT NULL, version INTEGER NOT NULL DEFAULT -1,
    PRIMARY KEY (workflow, version)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS runs_started ON runs (started_ms);
CREATE INDEX IF NOT EXISTS runs_finished ON runs (finished_ms);
CREATE INDEX IF NOT EXISTS runs_workflow ON runs (workflow, version, started_ms);
CREATE INDEX IF NOT EXISTS runs_workflow_status ON runs (workflow, version, status);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status, started_ms);
CREATE INDEX IF NOT EXISTS runs_correlation ON runs (correlation_id);
CREATE TABLE IF NOT EXISTS events (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    step TEXT,
    at_ms INTEGER,
    body TEXT,
    PRIMARY KEY (topic, partition, "offset")
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_run ON events (run_id, at_ms);
CREATE TABLE IF NOT EXISTS forgotten (run_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS positions (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS definitions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    source TEXT NOT NULL,
    deployed_at TEXT,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class RunFilter:
    """What the runs list shows: every field optional; ``q`` matches a run_id prefix or a correlation_id."""

    workflow: str | None = None
    status: str | None = None
    version: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    q: str | None = None


def open_index(data_dir: Path, prefix: str, name: str, wait: bool = False) -> "RunIndex":
    """The index file ``<data_dir>/console/<prefix>-<name>.sqlite``, locked for this process.

    Each process feeds its own file. When another process holds it, ``wait`` waits for it (the CLI: the next
    ``legato runs`` reuses what the last one read); otherwise the next free ``<name>-2``, ``<name>-3``… is used.
    """
    folder = Path(data_dir) / "console"
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, 100):
        path = folder / f"{prefix}-{name}{'' if n == 1 else f'-{n}'}.sqlite"
        lock = open(f"{path}.lock", "a+b")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        index = RunIndex(path, prefix)
        index._lock = lock  # held (and released by close) for the life of the index
        return index
    raise RuntimeError(f"no free index file under {folder}")


class RunIndex:
    """One SQLite file (WAL) per process; ``apply`` records, then ``commit`` with their offsets."""

    def __init__(self, path: str | Path, prefix: str):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.topics = Topics(prefix)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self._in_tx = False
        self._lock: Any = None
        self._event_kinds = {
            self.topics.runs: "run",
            self.topics.coordinator: "coordinator",
            self.topics.completions: "completion",
            self.topics.cancellations: "cancellation",
            self.topics.signals: "signal",
            self.topics.progress: "progress",
            self.topics.triggers: "trigger",
        }
        self._requests_prefix = self.topics.requests("")

    def close(self) -> None:
        self.db.close()
        if self._lock is not None:
            self._lock.close()

    # --- writing ---------------------------------------------------------------------------------

    def begin(self) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False

    def apply_all(self, records: Iterable[tuple[str, int, int, bytes | None, bytes | None, int]]) -> int:
        """Apply (topic, partition, offset, key, value, timestamp_ms) records in one transaction; returns how many."""
        n = 0
        self.begin()
        try:
            for record in records:
                self.apply(*record)
                n += 1
        except BaseException:
            self.db.execute("ROLLBACK")
            self._in_tx = False
            raise
        self.commit()
        return n

    def apply(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, timestamp_ms: int) -> None:
        """Fold one record into the view and advance that partition's position (inside the open transaction)."""
        self.db.execute(
            'INSERT INTO positions (topic, partition, next_offset) VALUES (?, ?, ?) '
            'ON CONFLICT (topic, partition) DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)',
            (topic, partition, offset + 1))
        if topic == self.topics.changelog:
            self._apply_state(key, value, f"{topic}/{partition}/{offset}", timestamp_ms)
            return
        if topic == self.topics.definitions:
            self._apply_definition(value)
            return
        raw = _object(value)
        if raw is None:
            return
        run_id = raw.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            return
        if self._forgotten(run_id):
            return
        if topic == self.topics.runs:
            self._apply_run_event(raw, timestamp_ms)
        elif (topic == self.topics.coordinator and raw.get("type") == "run.accepted") or topic == self.topics.triggers:
            self._apply_accepted(raw, timestamp_ms)  # a trigger keyed by its run_id is accepted without a run.accepted
        kind = self._kind(topic, raw)
        if kind is None:
            return
        step = raw.get("step_id") or raw.get("step_key") or raw.get("signal") or raw.get("timer_id")
        body = value.decode("utf-8", "replace") if value is not None else ""
        self.db.execute('INSERT OR IGNORE INTO events (topic, partition, "offset", run_id, kind, step, at_ms, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
                        (topic, partition, offset, run_id, kind, None if step is None else str(step), timestamp_ms, body[:BODY_LIMIT]))

    def _kind(self, topic: str, raw: dict[str, Any]) -> str | None:
        family = self._event_kinds.get(topic)
        if family is None:
            if topic.startswith(self._requests_prefix):
                return "activity.requested"
            return None
        if family == "run" or family == "coordinator" or family == "cancellation":
            return str(raw.get("type") or family)
        if family == "completion":
            return f"activity.{raw.get('status') or 'completed'}"
        if family == "signal":
            return "signal.sent"
        if family == "trigger":
            return "run.requested"
        return "progress.reported"

    def _forgotten(self, run_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM forgotten WHERE run_id = ?", (run_id,)).fetchone() is not None

    def _apply_state(self, key: bytes | None, value: bytes | None, at: str, timestamp_ms: int) -> None:
        if key is None or key == CHANGELOG_OFFSETS_KEY:  # the coordinator's input positions, not a run
            return
        run_id = key.decode("utf-8", "replace")
        if value is None:  # a tombstone: the run was forgotten, and so is everything the index knew of it
            self.db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
            self.db.execute("DELETE FROM documents WHERE run_id = ?", (run_id,))
            self.db.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
            self.db.execute("INSERT OR IGNORE INTO forgotten (run_id) VALUES (?)", (run_id,))
            return
        state = _object(value)
        if state is None:
            return
        self.db.execute("DELETE FROM forgotten WHERE run_id = ?", (run_id,))
        cost = state.get("cost") if isinstance(state.get("cost"), dict) else {}
        parent = state.get("parent")
        # the coordinator stores its documents without default values: a missing status is RunState's "running"
        self._upsert(run_id, workflow=_str(state.get("workflow")), version=_int(state.get("version")), status=_str(state.get("status", "running")),
                     started_ms=_int(state.get("started_ms")), finished_ms=_int(state.get("finished_ms")),
                     correlation_id=_str(state.get("correlation_id")),
                     parent=_str(parent.get("run_id")) if isinstance(parent, dict) else None,
                     cost_usd=_float(cost.get("usd")), state=value.decode("utf-8", "replace"), state_at=at, authoritative=True,
                     updated_ms=timestamp_ms)

    def _apply_run_event(self, raw: dict[str, Any], timestamp_ms: int) -> None:
        cost = raw.get("cost") if isinstance(raw.get("cost"), dict) else {}
        summary = {k: raw[k] for k in ("output", "error", "path", "cost", "stopped_by", "duration_ms") if raw.get(k) is not None}
        self._upsert(raw["run_id"], workflow=_str(raw.get("workflow")), status=_str(raw.get("status")),
                     started_ms=_iso_ms(raw.get("started_at")), finished_ms=_iso_ms(raw.get("finished_at")),
                     correlation_id=_str(raw.get("correlation_id")), cost_usd=_float(cost.get("usd")),
                     summary=orjson.dumps(summary).decode() if summary else None, updated_ms=timestamp_ms)

    def _apply_accepted(self, raw: dict[str, Any], timestamp_ms: int) -> None:
        parent = raw.get("parent")
        self._upsert(raw["run_id"], workflow=_str(raw.get("workflow")), status="running", started_ms=timestamp_ms,
                     correlation_id=_str(raw.get("correlation_id")),
                     parent=_str(parent.get("run_id")) if isinstance(parent, dict) else None, updated_ms=timestamp_ms)

    _DOCUMENT = ("state", "state_at", "summary")

    def _upsert(self, run_id: str, *, authoritative: bool = False, **fields: Any) -> None:
        """Merge what one record says about a run: the changelog's state wins; other sources fill gaps, and a
        finished run never goes back to running (records of different topics arrive in any order)."""
        document = {k: v for k in self._DOCUMENT if (v := fields.pop(k, None)) is not None}
        if document:
            cols = ["run_id", *document]
            self.db.execute(f"INSERT INTO documents ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                            f"ON CONFLICT (run_id) DO UPDATE SET {', '.join(f'{k} = excluded.{k}' for k in document)}",
                            (run_id, *document.values()))
        if authoritative:
            fields["has_state"] = 1
        if fields.get("workflow"):
            self.db.execute("INSERT OR IGNORE INTO workflow_versions (workflow, version) VALUES (?, ?)",
                            (fields["workflow"], fields["version"] if fields.get("version") is not None else -1))
        row = self.db.execute("SELECT status, has_state FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            cols = ["run_id", *(k for k, v in fields.items() if v is not None)]
            values = [v for v in fields.values() if v is not None]
            self.db.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", (run_id, *values))
            return
        current_status, has_state = row
        sets, params = [], []
        for name, value in fields.items():
            if value is None:
                continue
            if name == "status":
                if current_status in TERMINAL and value not in TERMINAL:
                    continue
                if has_state and not authoritative and not (value in TERMINAL and current_status not in TERMINAL):
                    continue
            elif has_state and not authoritative and name in ("workflow", "version", "started_ms", "finished_ms", "correlation_id"):
                continue
            sets.append(f"{name} = ?")
            params.append(value)
        if sets:
            self.db.execute(f"UPDATE runs SET {', '.join(sets)} WHERE run_id = ?", (*params, run_id))

    def _apply_definition(self, value: bytes | None) -> None:
        raw = _object(value)
        if raw is None or not isinstance(raw.get("name"), str) or _int(raw.get("version")) is None or not isinstance(raw.get("source"), str):
            return
        self.db.execute("INSERT OR REPLACE INTO definitions (name, version, source, deployed_at) VALUES (?, ?, ?, ?)",
                        (raw["name"], _int(raw["version"]), raw["source"], _str(raw.get("deployed_at"))))

    # --- reading ---------------------------------------------------------------------------------

    def positions(self) -> dict[tuple[str, int], int]:
        """The next offset to read of every topic partition seen so far."""
        return {(t, p): o for t, p, o in self.db.execute("SELECT topic, partition, next_offset FROM positions")}

    def list_runs(self, f: RunFilter = RunFilter(), limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Runs matching ``f``, newest first."""
        where, params = _where(f)
        sql = ("SELECT run_id, workflow, version, status, started_ms, finished_ms, correlation_id, parent, cost_usd "
               f"FROM runs {where} ORDER BY started_ms DESC, run_id DESC LIMIT ? OFFSET ?")
        cur = self.db.execute(sql, (*params, limit, offset))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur]

    def counts(self, f: RunFilter = RunFilter()) -> dict[str, int]:
        """How many runs match ``f`` by status (the status filter itself is ignored: the counts are the tabs)."""
        where, params = _where(RunFilter(f.workflow, None, f.version, f.since_ms, f.until_ms, f.q))
        return {status or "unknown": n for status, n in self.db.execute(f"SELECT status, COUNT(*) FROM runs {where} GROUP BY status", params)}

    def workflow_names(self) -> list[str]:
        """Every workflow name seen (forgotten runs' names too: they are few, and the list only offers a filter)."""
        return [w for (w,) in self.db.execute("SELECT DISTINCT workflow FROM workflow_versions ORDER BY workflow")]

    def workflows(self) -> list[tuple[str, int | None, str, int]]:
        """(workflow, version, status, runs) for every workflow version in the index."""
        return list(self.db.execute("SELECT workflow, version, status, COUNT(*) FROM runs GROUP BY workflow, version, status ORDER BY workflow, version"))

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The run's row with ``state`` and ``summary`` decoded (None when unknown or forgotten)."""
        cur = self.db.execute("SELECT runs.*, state, state_at, summary FROM runs LEFT JOIN documents USING (run_id) WHERE run_id = ?", (run_id,))
        row = cur.fetchone()
        if row is None:
            return None
        run = dict(zip([d[0] for d in cur.description], row))
        run["state"] = _complete(_object(run["state"].encode())) if run["state"] else None
        run["summary"] = _object(run["summary"].encode()) if run["summary"] else {}
        return run

    def events(self, run_id: str) -> list[dict[str, Any]]:
        """The run's history in the order it was written (time, then topic position)."""
        cur = self.db.execute('SELECT topic, partition, "offset", kind, step, at_ms, body FROM events WHERE run_id = ? '
                              'ORDER BY at_ms, topic, partition, "offset"', (run_id,))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur]

    def deployed(self) -> list[tuple[str, int, str | None]]:
        """(name, version, deployed_at) of every definition on the definitions topic."""
        return list(self.db.execute("SELECT name, version, deployed_at FROM definitions ORDER BY name, version"))

    def definition(self, name: str, version: int | None) -> str | None:
        """The deployed YAML of ``name@version`` (the highest version when None), if the definitions topic has it."""
        if version is None:
            row = self.db.execute("SELECT source FROM definitions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)).fetchone()
        else:
            row = self.db.execute("SELECT source FROM definitions WHERE name = ? AND version = ?", (name, version)).fetchone()
        return row[0] if row else None


def _where(f: RunFilter) -> tuple[str, list[Any]]:
    clauses, params = [], []
    if f.workflow:
        clauses.append("workflow = ?")
        params.append(f.workflow)
    if f.version is not None:
        clauses.append("version = ?")
        params.append(f.version)
    if f.status:
        clauses.append("status = ?")
        params.append(f.status)
    if f.since_ms is not None:
        clauses.append("started_ms >= ?")
        params.append(f.since_ms)
    if f.until_ms is not None:
        clauses.append("started_ms < ?")
        params.append(f.until_ms)
    if f.q:
        # a run_id prefix (a range, so the primary key serves it) or an exact correlation_id
        clauses.append("((run_id >= ? AND run_id < ?) OR correlation_id = ?)")
        params += [f.q, f.q + "\U0010ffff", f.q]
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def _complete(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """A state document with the defaults the coordinator leaves out (it stores ``exclude_defaults``), keeping every
    field this version does not know (a step's ``signal``, a ``schema_version``)."""
    if raw is None:
        return None
    try:
        full = RunState.model_validate(raw).model_dump(mode="json")
    except ValueError:  # msgspec's ValidationError, pydantic's too
        return raw
    steps = raw.get("steps") if isinstance(raw.get("steps"), dict) else {}
    full_steps = {k: {**full["steps"].get(k, {}), **v} if isinstance(v, dict) else full["steps"].get(k) for k, v in steps.items()}
    return {**full, **raw, "steps": full_steps, "frames": full["frames"]}


def _object(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return raw if isinstance(raw, dict) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _iso_ms(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None
