"""The console's pages over an index filled by hand (no Kafka): filters, escaping, security, read-only."""
from __future__ import annotations

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from legato.streams.config import Settings
from legato.streams.console.index import RunIndex
from legato.streams.console.web import Console, ConsoleError, _check_binding, gantt_bars, marked_graph, parse_filter, step_rows
from legato.topics.names import Topics
from tests.test_console_index import run_event, sample_log, state

T = Topics("legato")
XSS = '<script>window.pwned=1</script>"><img src=x onerror="window.pwned=2">'


def index_with_runs() -> RunIndex:
    log = sample_log()
    log.add(T.changelog, "evil", state("evil", workflow="wf", input={"text": XSS}, output={"answer": XSS}, correlation_id=XSS,
                                       status="waiting", started_ms=4000,
                                       steps={"approve": {"key": "approve", "step_id": "approve", "kind": "wait", "frame": "root",
                                                          "status": "waiting", "signal": "approval", "started_ms": 4000, "output": XSS}}), 4000)
    log.add(T.progress, "evil", orjson.dumps({"run_id": "evil", "step_id": "approve", "request_id": "q", "seq": 1, "chunk": "world"}), 4002)
    log.add(T.progress, "evil", orjson.dumps({"run_id": "evil", "step_id": "approve", "request_id": "q", "seq": 0, "chunk": "hello "}), 4001)
    index = RunIndex(":memory:", "legato")
    index.apply_all(log.records)
    return index


async def client_for(console: Console) -> TestClient:
    client = TestClient(TestServer(console.app()))
    await client.start_server()
    return client


@pytest.fixture
async def page():
    clients = []

    async def make(**kw) -> TestClient:
        c = await client_for(Console(Settings(), index_with_runs(), **kw))
        clients.append(c)
        return c
    yield make
    for c in clients:
        await c.close()


async def test_runs_page_lists_filters_and_counts(page):
    c = await page()
    html = await (await c.get("/")).text()
    for run_id in ("r1", "r2", "r3", "evil"):
        assert f'data-run-id="{run_id}"' in html
    assert 'data-status="failed">failed <b>1</b>' in html
    html = await (await c.get("/?status=failed&part=1")).text()
    assert 'data-run-id="r3"' in html and 'data-run-id="r1"' not in html and "<html" not in html
    html = await (await c.get("/?q=order-7")).text()
    assert 'data-run-id="r1"' in html and 'data-run-id="r3"' not in html
    html = await (await c.get("/?workflow=other&version=3")).text()
    assert 'data-run-id="r2"' in html and 'data-run-id="r1"' not in html


async def test_every_value_is_escaped_and_no_inline_script_may_run(page):
    c = await page()
    for url in ("/", "/run?id=evil", "/?q=" + "%3Cscript%3E"):
        response = await c.get(url)
        html = await response.text()
        assert "<script>window.pwned" not in html and "<img src=x" not in html, url
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    html = await (await c.get("/run?id=evil")).text()
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in html


async def test_run_page_shows_steps_waiting_signal_progress_and_history(page):
    c = await page()
    html = await (await c.get("/run?id=r1")).text()
    assert 'id="run-status">succeeded' in html and "wf@1" in html
    assert 'data-step="a"' in html and 'class="gantt"' in html
    assert f"{T.completions}/0/0" in html and "activity.succeeded" in html
    html = await (await c.get("/run?id=evil")).text()
    assert "waits for signal <b>approval</b>" in html and 'value="approval"' in html
    assert "hello world" in html  # partial results in seq order
    assert 'id="cancel"' in html
    assert "No run" in await (await c.get("/run?id=nope")).text()


async def test_read_only_has_no_actions_and_refuses_posts(page):
    c = await page(read_only=True)
    html = await (await c.get("/run?id=evil")).text()
    assert 'id="cancel"' not in html and "send-signal" not in html
    assert (await c.post("/run/cancel", data={"run_id": "evil"})).status == 403


async def test_actions_need_the_csrf_token(page):
    c = await page()
    assert (await c.post("/run/cancel", data={"run_id": "evil", "csrf": "wrong"})).status == 403
    assert (await c.post("/run/signal", data={"run_id": "evil", "signal": "approval"})).status == 403


async def test_a_token_guards_every_request(page):
    c = await page(token="s3cret")
    assert (await c.get("/")).status == 401
    assert (await c.get("/static/console.js")).status == 401
    response = await c.get("/?token=s3cret")
    assert response.status == 200
    assert (await c.get("/")).status == 200  # the cookie set by the first request


def test_binding_elsewhere_than_loopback_needs_a_token(monkeypatch):
    monkeypatch.delenv("LEGATO_CONSOLE_TOKEN", raising=False)
    assert _check_binding("127.0.0.1") is None and _check_binding("localhost") is None and _check_binding("::1") is None
    with pytest.raises(ConsoleError):
        _check_binding("0.0.0.0")
    monkeypatch.setenv("LEGATO_CONSOLE_TOKEN", "t")
    assert _check_binding("0.0.0.0") == "t"


def test_step_tree_and_gantt():
    doc = {"frames": {"root": {"id": "root", "ref": "root"}, "f1": {"id": "f1", "ref": "x", "owner": "p"}},
           "steps": {"p": {"key": "p", "step_id": "p", "kind": "parallel", "frame": "root", "status": "succeeded", "started_ms": 0, "finished_ms": 100},
                     "b": {"key": "b", "step_id": "b", "kind": "activity", "frame": "f1", "status": "succeeded", "started_ms": 10, "finished_ms": 60},
                     "z": {"key": "z", "step_id": "z", "kind": "activity", "frame": "root", "status": "running", "started_ms": 100}}}
    rows = step_rows(doc)
    assert [(r["key"], r["depth"]) for r in rows] == [("p", 0), ("b", 1), ("z", 0)]
    bars = gantt_bars(rows, 0, None, now_ms=200)
    assert [(b["left"], b["width"]) for b in bars] == [(0.0, 50.0), (5.0, 25.0), (50.0, 50.0)]


def test_graph_marks_the_steps_taken():
    source = ("name: g\nsteps:\n  - id: a\n    activity: x\n  - id: b\n    activity: y\n  - id: c\n    activity: z\n"
              "  - id: d\n    activity: w\n  - id: e\n    activity: v\n")
    steps = {"a": {"step_id": "a", "status": "succeeded"}, "b": {"step_id": "b", "status": "failed"},
             "c": {"step_id": "c", "status": "waiting"}, "e": {"step_id": "e", "status": "skipped"},
             # a step that ran twice (a map item, a loop iteration) shows its worst outcome, in either order
             "d#1": {"step_id": "d", "status": "failed"}, "d#2": {"step_id": "d", "status": "succeeded"}}
    text = marked_graph(source, {"steps": steps})
    assert text.startswith("flowchart TD")
    assert text.splitlines()[-3:] == ["    class s_c,wf_start path_ran", "    class s_a path_succeeded", "    class s_b,s_d path_failed"]
    assert "s_e path" not in text and "wf_end path" not in text
    for name in ("path_ran", "path_succeeded", "path_failed"):
        assert f"classDef {name} " in text
    # the run's own outcome marks End; nothing taken leaves the graph unmarked
    done = marked_graph(source, {"steps": {"a": {"step_id": "a", "status": "succeeded"}}}, run_status="succeeded")
    assert "    class s_a,wf_end path_succeeded" in done.splitlines()
    assert "    class " not in marked_graph(source, {}).split("classDef path_failed")[1]


def test_filter_from_query_ignores_what_does_not_parse():
    f = parse_filter({"status": "bogus", "version": "x", "since": "1h", "q": " r1 "}, now_ms=10_000_000)
    assert f.status is None and f.version is None and f.since_ms == 10_000_000 - 3_600_000 and f.q == "r1"
    assert parse_filter({"from": "2026-01-01T00:00", "to": "2026-01-02T00:00"}, 0).until_ms - parse_filter({"from": "2026-01-01T00:00"}, 0).since_ms == 86_400_000


async def test_workflows_pages_count_runs_and_draw_the_local_definition(tmp_path):
    (tmp_path / "wf.yaml").write_text("name: wf\nversion: 1\nsteps:\n  - id: a\n    activity: act\n", encoding="utf-8")
    c = await client_for(Console(Settings(workflow_dirs=[str(tmp_path)]), index_with_runs()))
    try:
        html = await (await c.get("/workflows")).text()
        assert "wf@1" in html and "other@3" in html and "deployed" in html
        html = await (await c.get("/workflow?name=wf&version=1")).text()
        assert "flowchart TD" in html and 'class="st-succeeded">succeeded <b>1</b>' in html
        html = await (await c.get("/run?id=r1")).text()
        assert "flowchart TD" in html and "local workflow directories" in html
    finally:
        await c.close()


def test_runs_cli_rendering():
    from legato.streams.runs import render_history, render_list, render_run

    index = index_with_runs()
    text = render_list(index.list_runs(), index.counts())
    assert text.splitlines()[0].split() == ["run_id", "workflow", "status", "started", "duration_ms", "correlation_id"]
    assert "r2" in text and "other@3" in text and text.endswith("1 failed, 1 running, 1 succeeded, 1 waiting")
    assert "status succeeded" in render_run(index.get_run("r1"))
    history = render_history(index.events("r1"))
    assert f"{T.completions}/0/0" in history and "activity.succeeded" in history
    index.apply_all([(T.runs, 1, 0, b"x9", run_event("x9", "run.failed", "failed", error={"type": "E", "message": "m"}), 1)])
    assert "error     E: m" in render_run(index.get_run("x9"))  # known from the runs topic only


async def test_redrive_only_for_failed_runs_and_fork_from_top_level_steps(page):
    c = await page()
    html = await (await c.get("/run?id=r3")).text()  # failed
    assert 'id="redrive"' in html and '<option value="a">a</option>' in html
    html = await (await c.get("/run?id=r1")).text()  # succeeded
    assert 'id="redrive"' not in html and 'id="fork"' in html
    assert (await c.post("/run/redrive", data={"run_id": "r3"})).status == 403  # no CSRF token
    assert 'id="fork"' not in await (await (await page(read_only=True)).get("/run?id=r1")).text()


async def test_deployed_definitions_without_runs_are_listed():
    index = index_with_runs()
    index.apply_all([(T.definitions, 0, 0, b"fresh@2", orjson.dumps({"name": "fresh", "version": 2, "sha256": "0" * 64,
                                                                       "source": "name: fresh\nversion: 2\nsteps:\n  - id: a\n    activity: x\n",
                                                                       "deployed_at": "2026-12-01T00:00:00Z"}), 1)])
    c = await client_for(Console(Settings(), index))
    try:
        html = await (await c.get("/workflows")).text()
        assert "fresh@2" in html and "2026-12-01T00:00:00Z" in html
        html = await (await c.get("/workflow?name=fresh&version=2")).text()
        assert "flowchart TD" in html and T.definitions in html
    finally:
        await c.close()


async def test_schedules_page_lists_schedules_with_last_and_next_ticks_and_their_runs():
    from legato.streams.schedules import fired_key
    from legato.workflows.schedule import ScheduleFired, ScheduleSpec, run_id

    index = index_with_runs()
    tick = 1_800_000_000_000
    rid = run_id("nightly", tick)
    index.apply_all([(T.runs, 0, 0, rid.encode(), run_event(rid, "run.completed", "succeeded", correlation_id="schedule:nightly"), 1)])
    console = Console(Settings(), index)
    spec = ScheduleSpec(name="nightly", workflow="wf", cron="0 2 * * *", timezone="Europe/Paris", overlap="skip", created_ms=tick - 86_400_000)
    console.schedules.on_record(b"nightly", orjson.dumps(spec.model_dump()))
    console.schedules.on_record(fired_key("nightly"), orjson.dumps(ScheduleFired(name="nightly", created_ms=spec.created_ms, last_tick_ms=tick,
                                                                                 last_run_id=rid).model_dump()))
    evil = ScheduleSpec(name="evil", workflow=XSS[:50], every_ms=60_000, created_ms=tick, paused=True)
    console.schedules.on_record(b"evil", orjson.dumps(evil.model_dump()))
    c = await client_for(console)
    try:
        html = await (await c.get("/schedules")).text()
        assert "nightly" in html and "cron 0 2 * * *" in html and "Europe/Paris" in html and "skip" in html
        assert "2027-01-15T08:00:00.000Z" in html  # the last tick
        assert f'href="/run?id={rid}"' in html and "succeeded" in html
        assert "paused" in html and "<script>window.pwned" not in html
        assert 'href="/schedules"' in html
    finally:
        await c.close()


async def test_a_value_stored_by_reference_shows_its_size_and_a_fetch_link(tmp_path):
    settings = Settings(payload_store=f"file://{tmp_path / 'store'}", payload_inline_max=100)
    payloads = settings.payloads()
    ref = await payloads.put("big", {"text": "w" * 5000})
    log = sample_log()
    log.add(T.changelog, "big", state("big", status="succeeded", output={"doc": ref}, steps={
        "a": {"key": "a", "step_id": "a", "kind": "activity", "frame": "root", "status": "succeeded", "started_ms": 1000, "output": {"doc": ref}}}), 5000)
    index = RunIndex(":memory:", "legato")
    index.apply_all(log.records)
    c = await client_for(Console(settings, index))
    try:
        html = await (await c.get("/run?id=big")).text()
        assert "5.0 kB by ref" in html and 'href="/run/payload?id=big&amp;step=a"' in html and 'href="/run/payload?id=big&amp;step=output"' in html
        response = await c.get("/run/payload?id=big&step=a")
        assert response.status == 200 and await response.json() == {"doc": {"text": "w" * 5000}}
        assert (await c.get("/run/payload?id=big&step=nope")).status == 404
        assert (await c.get("/run/payload?id=nope&step=a")).status == 404
    finally:
        await c.close()
