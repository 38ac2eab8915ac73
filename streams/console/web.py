"""``legato console``: server-rendered pages over the run index, and actions that are records on the CLI's topics.

aiohttp serves Jinja2 templates with autoescaping on (every run value is escaped), one small script, one
stylesheet and the vendored Mermaid renderer (``static/vendor/``) from ``static/`` (nothing is fetched from
elsewhere; a Content-Security-Policy forbids it and any inline script). The index is fed by a ``Feed`` task in the same event loop.

Security: bound to loopback by default; any other address needs ``LEGATO_CONSOLE_TOKEN`` and then every request
must carry it (``?token=`` once, then a cookie). Actions are POSTs with a per-process CSRF token; ``--read-only``
removes them.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
import orjson
import yaml
from aiohttp import web
from aiokafka import AIOKafkaProducer

from legato.streams import security
from legato.streams.config import Settings
from legato.streams.console.feed import Feed
from legato.streams.console.index import STATUSES, RunFilter, RunIndex, open_index
from legato.streams.runs import limit_key_names, limit_wait
from legato.streams.schedule_cli import view as schedule_view
from legato.streams.runs import state_of, value_size
from legato.streams.schedules import ScheduleTable
from legato.streams.worker_support import tail_topic
from legato.topics import codec
from legato.topics.client import LegatoClient
from legato.topics.models import SignalSent
from legato.topics.payload_refs import refs_in
from legato.workflows.durations import parse_duration

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
TOKEN_COOKIE = "legato_console_token"
CSP = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'"
SINCE_CHOICES = ("15m", "1h", "24h", "168h")


class ConsoleError(Exception):
    """The console cannot start as asked (e.g. a public address without a token)."""


# --- pure helpers (rendering data) ---------------------------------------------------------------


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS, default=str).decode()


def _cost(cost: Any) -> str:
    if not isinstance(cost, dict) or not cost:
        return "-"
    parts = []
    if isinstance(cost.get("usd"), (int, float)):
        parts.append(f"${cost['usd']:.4f}")
    tokens = sum(v for v in (cost.get("tokens_in"), cost.get("tokens_out")) if isinstance(v, int))
    if tokens:
        parts.append(f"{tokens} tok")
    return " ".join(parts) or "-"


_STEP_DEFAULTS = {k: None for k in ("key", "kind", "status", "attempt", "started_ms", "finished_ms", "confidence", "cost",
                                     "output", "error", "path", "child_run", "signal")}


def step_rows(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The step tree as rows in start order, each with its depth (a compound step's children follow it)."""
    steps = state.get("steps") or {}
    frames = state.get("frames") or {}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for step in steps.values():
        if not isinstance(step, dict):
            continue
        frame = frames.get(step.get("frame")) or {}
        children.setdefault(frame.get("owner"), []).append(step)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()

    def walk(owner: str | None, depth: int) -> None:
        for step in sorted(children.get(owner, []), key=lambda s: (s.get("started_ms") or 0)):
            key = step.get("key")
            if key in seen:
                continue
            seen.add(key)
            rows.append({**_STEP_DEFAULTS, **step, "depth": depth})
            walk(key, depth + 1)

    walk(None, 0)
    for step in steps.values():  # a frame whose owner left the state (a finished map item): keep it visible
        if isinstance(step, dict) and step.get("key") not in seen:
            rows.append({**_STEP_DEFAULTS, **step, "depth": 0})
    return rows


def limit_waits(state: dict[str, Any], source: str | None) -> tuple[str | None, dict[str, str]]:
    """What the run waits for (its concurrency key) and, by step key, what each step waits for (a limit and its key),
    while their acquisitions are not granted; ``source``, the workflow's YAML, names the limit keys."""
    names = limit_key_names(source)
    steps = {}
    for step in (state.get("steps") or {}).values():
        if isinstance(step, dict) and (text := limit_wait(step.get("limit_hold"), names.get(str(step.get("step_id"))))) is not None:
            steps[str(step.get("key"))] = text
    return limit_wait(state.get("limit_hold")), steps


def gantt_bars(rows: list[dict[str, Any]], run_start: int | None, run_end: int | None, now_ms: int) -> list[dict[str, Any]]:
    """Left offset and width (percent of the run) of each step's bar."""
    starts = [r.get("started_ms") for r in rows if isinstance(r.get("started_ms"), int)]
    if run_start is None:
        run_start = min(starts) if starts else now_ms
    end = run_end if run_end is not None else now_ms
    ends = [r["finished_ms"] for r in rows if isinstance(r.get("finished_ms"), int)]
    end = max([end, *ends, run_start + 1])
    span = end - run_start
    bars = []
    for r in rows:
        start = r.get("started_ms") if isinstance(r.get("started_ms"), int) else run_start
        finish = r.get("finished_ms") if isinstance(r.get("finished_ms"), int) else end
        left = max(0.0, (start - run_start) * 100 / span)
        bars.append({"key": r.get("key"), "status": r.get("status"), "depth": r.get("depth", 0), "left": round(left, 2),
                     "width": round(max(0.5, min(100 - left, (finish - start) * 100 / span)), 2), "ms": finish - start})
    return bars


PATH_CLASSES = (
    ("path_ran", "stroke:#2563eb,stroke-width:3px"),
    ("path_succeeded", "fill:#bbf7d0,stroke:#15803d,stroke-width:3px,color:#052e16"),
    ("path_failed", "fill:#fecaca,stroke:#b91c1c,stroke-width:3px,color:#450a0a"),
)
"""The classes ``marked_graph`` adds to the steps a run went through: started (running, waiting, cancelled),
succeeded, failed (or timed out). They are apart from the definition's own ``done``/``fail`` classes, which mark
what an end or fail step is, not whether the run reached it."""

_PATH_OF_STATUS = {"succeeded": "path_succeeded", "failed": "path_failed", "timed_out": "path_failed",
                   "running": "path_ran", "waiting": "path_ran", "waiting_retry": "path_ran", "cancelled": "path_ran"}
_PATH_RANK = {"path_ran": 0, "path_succeeded": 1, "path_failed": 2}


def marked_graph(source: str, state: dict[str, Any], run_status: str | None = None) -> str:
    """The workflow's Mermaid flowchart with the path this run took highlighted.

    Each step the run started gets one of ``PATH_CLASSES``; a step that ran more than once (map items, loop
    iterations) shows its worst outcome (failed over succeeded over started). Start is marked once any step
    started, End once the run succeeded. Skipped steps are not on the path.
    """
    from legato.workflows.graph import END_ID, START_ID, _node_id, mermaid
    from legato.workflows.model import compile_workflow

    text = mermaid(compile_workflow(yaml.safe_load(source)))
    marks: dict[str, str] = {}
    for step in (state.get("steps") or {}).values():
        if isinstance(step, dict) and step.get("step_id"):
            cls = _PATH_OF_STATUS.get(step.get("status"))
            node = _node_id("s", step["step_id"])
            if cls and _PATH_RANK[cls] >= _PATH_RANK.get(marks.get(node, ""), -1):
                marks[node] = cls
    if marks:
        marks[START_ID] = "path_ran"
    if run_status == "succeeded":
        marks[END_ID] = "path_succeeded"
    lines = [f"    classDef {name} {style}" for name, style in PATH_CLASSES]
    for name, _ in PATH_CLASSES:
        nodes = sorted(node for node, cls in marks.items() if cls == name)
        if nodes:
            lines.append(f"    class {','.join(nodes)} {name}")
    return text + "\n" + "\n".join(lines)


def progress_by_request(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Partial results: the chunks of each request's ``progress.reported`` records in ``seq`` order."""
    out: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["kind"] != "progress.reported":
            continue
        try:
            raw = orjson.loads(e["body"])
        except orjson.JSONDecodeError:
            continue
        item = out.setdefault(str(raw.get("request_id")), {"request_id": raw.get("request_id"), "step": raw.get("step_id"), "chunks": {}})
        item["chunks"][raw.get("seq", 0)] = raw.get("chunk")
    result = []
    for item in out.values():
        chunks = [item["chunks"][k] for k in sorted(item["chunks"], key=lambda k: k if isinstance(k, int) else 0)]
        text = "".join(chunks) if all(isinstance(c, str) for c in chunks) else _pretty(chunks)
        result.append({"request_id": item["request_id"], "step": item["step"], "n": len(chunks), "text": text})
    return result


def parse_filter(query: Any, now_ms: int) -> RunFilter:
    """A RunFilter from the query string; values that do not parse are ignored (the page shows what it used)."""
    def text(name: str) -> str | None:
        value = (query.get(name) or "").strip()
        return value or None

    version = text("version")
    since_ms = None
    if text("since"):
        try:
            since_ms = now_ms - int(parse_duration(text("since")) * 1000)
        except ValueError:
            pass
    since_ms = _local_ms(text("from")) or since_ms
    status = text("status")
    return RunFilter(workflow=text("workflow"), status=status if status in STATUSES else None,
                     version=int(version) if version and version.isdigit() else None, since_ms=since_ms,
                     until_ms=_local_ms(text("to")) if text("to") else None, q=text("q"))


def _local_ms(value: str | None) -> int | None:
    """A ``datetime-local`` value (read as UTC) in epoch ms."""
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


# --- the web application -----------------------------------------------------------------------------


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(iso=_iso, pretty=_pretty, cost=_cost, size=value_size, by_ref=lambda v: bool(refs_in(v)))
    return env


class Console:
    """The pages and actions of one console process over one index."""

    def __init__(self, settings: Settings, index: RunIndex, *, read_only: bool = False, token: str | None = None):
        self.settings = settings
        self.index = index
        self.read_only = read_only
        self.token = token
        self.csrf = secrets.token_urlsafe(24)
        self.templates = _templates()
        self.client: LegatoClient | None = None
        self.producer: AIOKafkaProducer | None = None
        self.changes = 0  # bumped whenever the index changed: the pages poll it
        self._local: dict[tuple[str, int], str] | None = None
        self.schedules = ScheduleTable()  # followed from <prefix>.schedules while the console runs
        self._schedules_tail: asyncio.Task | None = None

    # --- plumbing --------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.add_routes([
            web.get("/", self.runs_page),
            web.get("/run", self.run_page),
            web.get("/workflows", self.workflows_page),
            web.get("/workflow", self.workflow_page),
            web.get("/schedules", self.schedules_page),
            web.get("/run/payload", self.payload),
            web.post("/run/cancel", self.cancel),
            web.post("/run/signal", self.signal),
            web.post("/run/redrive", self.redrive),
            web.post("/run/fork", self.fork),
            web.static("/static", HERE / "static"),
        ])
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.perf_counter()
        if self.token is not None:
            given = request.query.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return web.Response(status=401, text="legato console: a token is required (?token=...)")
        response = await handler(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
        if self.token is not None and request.query.get("token"):
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="Strict")
        return response

    def _html(self, template: str, **context: Any) -> web.Response:
        body = self.templates.get_template(template).render(read_only=self.read_only, csrf=self.csrf, prefix=self.settings.prefix, **context)
        return web.Response(text=body, content_type="text/html")

    # --- pages -----------------------------------------------------------------------------------

    def runs_context(self, query: Any) -> dict[str, Any]:
        """What the runs page shows for ``query`` (the benchmark measures this and its rendering)."""
        now_ms = int(time.time() * 1000)
        f = parse_filter(query, now_ms)
        try:
            page = max(1, int(query.get("page") or 1))
        except ValueError:
            page = 1
        rows = self.index.list_runs(f, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE)
        counts = self.index.counts(f)
        keep = {k: v for k, v in query.items() if k not in ("page", "part", "token") and v}
        return {
            "filter": f, "query": keep, "rows": rows[:PAGE_SIZE], "page": page, "more": len(rows) > PAGE_SIZE,
            "counts": counts, "total": sum(counts.values()), "statuses": STATUSES, "since_choices": SINCE_CHOICES,
            "workflows": self.index.workflow_names(),
            "link": lambda **over: "?" + urlencode({**keep, **over}),
            "now_ms": now_ms, "changes": self.changes,
        }

    async def runs_page(self, request: web.Request) -> web.Response:
        context = self.runs_context(request.query)
        return self._html("runs_part.html" if request.query.get("part") else "runs.html", **context)

    async def run_page(self, request: web.Request) -> web.Response:
        run_id = request.query.get("id", "")
        run = self.index.get_run(run_id)
        if run is None:
            return self._html("missing.html", run_id=run_id)
        state = run["state"] or {}
        summary = run["summary"] or {}
        events = self.index.events(run_id)
        rows = step_rows(state)
        run_waits, step_waits = limit_waits(state, self._source(run["workflow"], run["version"]) if run["status"] == "running" else None)
        for row in rows:
            row["limit_wait"] = step_waits.get(str(row.get("key")))
        now_ms = int(time.time() * 1000)
        context = {
            "run_waits": run_waits, "limit_waiting": [r for r in rows if r["limit_wait"]],
            "run": run, "state": state, "summary": summary, "events": events, "steps": rows,
            "bars": gantt_bars(rows, run["started_ms"], run["finished_ms"], now_ms),
            "waiting": [r for r in rows if r.get("status") == "waiting"],
            "progress": progress_by_request(events), "graph": self._graph(run["workflow"], run["version"], state, run["status"]),
            "output": state.get("output", summary.get("output")), "error": state.get("error") or summary.get("error"),
            "cost": state.get("cost") or summary.get("cost"), "path": state.get("path") or summary.get("path") or [],
            "finished": run["status"] in ("succeeded", "failed", "cancelled"),
            "top_steps": list(dict.fromkeys(r["step_id"] for r in rows if r.get("frame") == "root" and r.get("step_id"))),  # fork points
            "flash": request.query.get("done"), "changes": self.changes,
        }
        return self._html("run_part.html" if request.query.get("part") else "run.html", **context)

    async def payload(self, request: web.Request) -> web.Response:
        """A step's output (``step``: its key; ``input`` / ``output``: the run's) with its payload references fetched,
        as JSON: the console's fetch link of a value stored by reference."""
        run = self.index.get_run(request.query.get("id", ""))
        state = state_of(run) if run is not None else None
        name = request.query.get("step", "")
        if state is None:
            return web.Response(status=404, text="no such run, or no stored state")
        step = state.steps.get(name)
        if step is None and name not in ("input", "output"):
            return web.Response(status=404, text=f"no step {name!r} in run {state.run_id!r}")
        value = step.output if step is not None else state.input if name == "input" else state.output
        payloads = self.settings.payloads()
        try:
            resolved = await payloads.resolve(value) if payloads is not None else value
        except Exception as exc:  # deleted by retention, corrupted, the broker away
            return web.Response(status=502, text=f"cannot fetch: {type(exc).__name__}: {exc}")
        finally:
            if payloads is not None:
                await payloads.stop()
        return web.Response(body=orjson.dumps(resolved), content_type="application/json")

    async def workflows_page(self, request: web.Request) -> web.Response:
        table: dict[tuple[str, Any], dict[str, int]] = {}
        for workflow, version, status, n in self.index.workflows():
            table.setdefault((workflow or "?", version), {})[status or "unknown"] = n
        deployed = {(name, version): at for name, version, at in self.index.deployed()}
        for key in deployed:
            table.setdefault(key, {})
        rows = [{"workflow": w, "version": v, "counts": c, "total": sum(c.values()), "deployed_at": deployed.get((w, v))}
                for (w, v), c in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))]
        return self._html("workflows.html", rows=rows, statuses=STATUSES)

    async def workflow_page(self, request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        version = request.query.get("version", "")
        v = int(version) if version.isdigit() else None
        counts: dict[str, int] = {}
        for workflow, ver, status, n in self.index.workflows():
            if workflow == name and (v is None or ver == v):
                counts[status or "unknown"] = counts.get(status or "unknown", 0) + n
        return self._html("workflow.html", name=name, version=v, counts=counts, statuses=STATUSES, graph=self._graph(name, v, {}))

    async def schedules_page(self, request: web.Request) -> web.Response:
        now_ms = int(time.time() * 1000)
        rows = []
        for name in sorted(self.schedules.specs):
            row = schedule_view(self.schedules.specs[name], self.schedules, now_ms, upcoming=3)
            row["runs"] = self.index.list_runs(RunFilter(q=f"schedule:{name}"), limit=5)
            rows.append(row)
        return self._html("schedules.html", rows=rows, topic=self.settings.topics.schedules)

    def _source(self, workflow: str | None, version: int | None) -> str | None:
        """The workflow's YAML from the definitions topic, else from the local workflow directories."""
        if not workflow:
            return None
        return self.index.definition(workflow, version) or self._local_definition(workflow, version)

    def _graph(self, workflow: str | None, version: int | None, state: dict[str, Any], run_status: str | None = None) -> dict[str, str] | None:
        """The workflow's flowchart from the definitions topic, else from the local workflow directories."""
        source = self.index.definition(workflow, version) if workflow else None
        origin = self.settings.topics.definitions
        if source is None:
            source, origin = self._local_definition(workflow, version), "local workflow directories"
        if source is None:
            return None
        try:
            return {"text": marked_graph(source, state, run_status), "origin": origin}
        except Exception as exc:  # a definition this version cannot compile: say so instead of failing the page
            return {"text": f"cannot draw the graph: {exc}", "origin": origin}

    def _local_definition(self, name: str | None, version: int | None) -> str | None:
        """``name@version`` (the highest version when None) from the console's --workflows directories."""
        if self._local is None:
            self._local = {}
            for directory in self.settings.workflow_dirs:
                for path in sorted([*Path(directory).glob("*.yaml"), *Path(directory).glob("*.yml")]):
                    try:
                        text = path.read_text(encoding="utf-8")
                        doc = yaml.safe_load(text)
                    except (OSError, yaml.YAMLError):
                        continue
                    if isinstance(doc, dict) and isinstance(doc.get("name"), str) and isinstance(doc.get("version", 1), int):
                        self._local[(doc["name"], doc.get("version", 1))] = text
        versions = sorted(v for n, v in self._local if n == name)
        if not versions:
            return None
        return self._local.get((name, versions[-1] if version is None else version))

    # --- actions ---------------------------------------------------------------------------------

    async def _action_form(self, request: web.Request) -> tuple[str, Any]:
        if self.read_only:
            raise web.HTTPForbidden(text="legato console: read-only")
        form = await request.post()
        if not hmac.compare_digest(str(form.get("csrf", "")).encode(), self.csrf.encode()):
            raise web.HTTPForbidden(text="legato console: bad or missing CSRF token (reload the page)")
        run_id = str(form.get("run_id", ""))
        if not run_id:
            raise web.HTTPBadRequest(text="legato console: no run_id")
        return run_id, form

    async def cancel(self, request: web.Request) -> web.Response:
        """The same ``run.cancel_requested`` record as ``legato cancel``."""
        run_id, form = await self._action_form(request)
        assert self.client is not None
        await self.client.cancel(run_id, str(form.get("reason") or "cancelled from the console"))
        raise web.HTTPSeeOther("/run?" + urlencode({"id": run_id, "done": "cancel requested"}))

    async def signal(self, request: web.Request) -> web.Response:
        """A ``SignalSent`` record on the signals topic, keyed by the run_id."""
        run_id, form = await self._action_form(request)
        name = str(form.get("signal") or "").strip()
        raw = str(form.get("data") or "").strip()
        try:
            data = orjson.loads(raw) if raw else None
            record = SignalSent(run_id=run_id, signal=name, data=data, signal_id=secrets.token_hex(8))
        except (orjson.JSONDecodeError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"legato console: bad signal: {exc}")
        assert self.producer is not None
        await self.producer.send_and_wait(self.settings.topics.signals, codec.dumps(record), key=run_id.encode())
        raise web.HTTPSeeOther("/run?" + urlencode({"id": run_id, "done": f"signal {name} sent"}))

    async def redrive(self, request: web.Request) -> web.Response:
        """The same ``run.redrive_requested`` record as ``legato redrive`` (a run that is not failed is left as it is)."""
        run_id, form = await self._action_form(request)
        assert self.client is not None
        await self.client.redrive(run_id, str(form.get("reason") or "redriven from the console"))
        raise web.HTTPSeeOther("/run?" + urlencode({"id": run_id, "done": "redrive requested"}))

    async def fork(self, request: web.Request) -> web.Response:
        """The same ``run.fork_requested`` record as ``legato fork``; then the new run's page."""
        run_id, form = await self._action_form(request)
        step = str(form.get("from_step") or "").strip()
        raw = str(form.get("input") or "").strip()
        try:
            new_input = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError as exc:
            raise web.HTTPBadRequest(text=f"legato console: fork input is not JSON: {exc}")
        if not step or (new_input is not None and not isinstance(new_input, dict)):
            raise web.HTTPBadRequest(text="legato console: a fork needs a step, and its input (if any) is a JSON object")
        assert self.client is not None
        new_run_id = await self.client.fork(run_id, step, new_input, reason="forked from the console")
        raise web.HTTPSeeOther("/run?" + urlencode({"id": new_run_id, "done": f"forked from {run_id} at {step}"}))

    # --- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._schedules_tail = asyncio.create_task(tail_topic(self.settings.bootstrap, self.settings.topics.schedules, self.schedules.on_record,
                                                              from_beginning=True), name="legato.console.schedules")
        if not self.read_only:
            kafka = security.aiokafka_kwargs()
            self.client = LegatoClient(self.settings.bootstrap, self.settings.prefix, **kafka)
            await self.client.__aenter__()
            self.producer = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap, acks="all", linger_ms=0, **kafka)
            await self.producer.start()

    async def stop(self) -> None:
        if self._schedules_tail is not None:
            self._schedules_tail.cancel()
            await asyncio.gather(self._schedules_tail, return_exceptions=True)
        if self.producer is not None:
            await self.producer.stop()
        if self.client is not None:
            await self.client.__aexit__(None, None, None)

    def changed(self) -> None:
        self.changes += 1


def _check_binding(host: str) -> str | None:
    """The token the console requires: None on loopback; elsewhere LEGATO_CONSOLE_TOKEN, or ConsoleError."""
    token = security.console_token()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and token is None:
        raise ConsoleError(f"refusing to listen on {host} without LEGATO_CONSOLE_TOKEN (every request must then carry it)")
    return token


async def run_console(settings: Settings, host: str, port: int, read_only: bool, started: "asyncio.Future[str] | None" = None,
                      stop: asyncio.Event | None = None) -> None:
    """Feed the index and serve the pages until ``stop`` is set (or the task is cancelled)."""
    token = _check_binding(host)
    index = open_index(settings.data_dir, settings.prefix, f"console-{port}")
    console = Console(settings, index, read_only=read_only, token=token)
    runner = web.AppRunner(console.app(), access_log=None)
    try:
        async with Feed(settings.bootstrap, index, settings.prefix, **security.aiokafka_kwargs()) as feed:
            await console.start()
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            url = f"http://{host}:{port}/"
            if started is not None and not started.done():
                started.set_result(url)
            follow = asyncio.create_task(feed.follow(console.changed))
            try:
                await (stop.wait() if stop is not None else asyncio.Event().wait())
            finally:
                follow.cancel()
                await asyncio.gather(follow, return_exceptions=True)
    finally:
        await runner.cleanup()
        await console.stop()
        index.close()


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8080, read_only: bool = False) -> None:
    """``legato console``: serve until SIGINT or SIGTERM."""
    _check_binding(host)
    logging.basicConfig(level=settings.loglevel.upper())

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        started: asyncio.Future[str] = loop.create_future()
        started.add_done_callback(lambda f: print(f"legato console: {f.result()}", flush=True))
        await run_console(settings, host, port, read_only, started, stop)

    asyncio.run(main())


def serve_in_thread(settings: Settings, host: str = "127.0.0.1", port: int = 8080, timeout: float = 30.0) -> str:
    """Serve the console from a daemon thread (``legato dev``); returns its URL once it listens."""
    result: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        started.add_done_callback(lambda f: (result.setdefault("url", f.result()), ready.set()))
        await run_console(settings, host, port, False, started)

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the caller; dev goes on without a console
            result["error"] = exc
            ready.set()

    threading.Thread(target=target, name="legato-console", daemon=True).start()
    if not ready.wait(timeout):
        raise ConsoleError(f"the console did not start within {timeout:g}s")
    if "error" in result:
        raise ConsoleError(str(result["error"]))
    return result["url"]
