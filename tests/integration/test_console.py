"""The run console on the real broker: `legato runs` and `legato console` as separate processes, and the page in a
real browser (Debian's Chromium, headless, driven by Playwright)."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import orjson
import pytest

from legato.topics.models import SignalSent
from tests.conftest import skip_or_fail
from tests.integration.conftest import REPO_ROOT, legato_executable
from tests.integration.test_cli import cli

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
XSS = '<script>window.pwned=1</script>"><img src=x onerror="window.pwned=2">'
SCREENSHOTS = os.environ.get("LEGATO_SCREENSHOTS")  # a directory to keep the page screenshots in (docs/ for docs/console.md)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _until(check, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.3)


@pytest.fixture(scope="module")
def runs_env(legato, tmp_path_factory):
    """The harness's environment with a data dir of its own (so `legato runs` builds its index from nothing)."""
    return {**legato.env, "LEGATO_DATA_DIR": str(tmp_path_factory.mktemp("console-data")), "LEGATO_LOGLEVEL": "warning"}


async def test_runs_list_and_show_read_the_topics(legato, runs_env, tmp_path):
    tag = uuid.uuid4().hex[:8]
    done = await legato.run("e2e_sequential", {"start": 1}, run_id=f"seq-{tag}")
    assert done.status == "succeeded"
    waiting = await legato.trigger("e2e_external", {"text": "hi"}, run_id=f"ext-{tag}", correlation_id=f"order-{tag}")

    async def listed():
        code, out, err = await cli("runs", "list", "--json", "--limit", "500", env=runs_env)
        assert code == 0, err
        rows = {r["run_id"]: r for r in orjson.loads(out)}
        return rows if waiting in rows and rows[waiting]["version"] is not None else None

    rows = await _until(listed, what="the runs in `legato runs list --json`")
    assert rows[f"seq-{tag}"]["status"] == "succeeded" and rows[f"seq-{tag}"]["workflow"] == "e2e_sequential"
    assert rows[waiting]["status"] == "running" and rows[waiting]["correlation_id"] == f"order-{tag}"

    code, out, err = await cli("runs", "list", "--json", "--status", "succeeded", "--workflow", "e2e_sequential", "--since", "1h", env=runs_env)
    assert code == 0, err
    assert {r["status"] for r in orjson.loads(out)} == {"succeeded"} and f"seq-{tag}" in {r["run_id"] for r in orjson.loads(out)}
    code, out, err = await cli("runs", "list", "--workflow", "e2e_sequential", env=runs_env)
    assert code == 0 and f"seq-{tag}" in out and "e2e_sequential@1" in out, (out, err)

    code, out, err = await cli("runs", "show", f"seq-{tag}", env=runs_env)
    assert code == 0, err
    assert "status succeeded" in out and "first" in out and "third" in out
    assert f"{legato.topics.completions}/" in out and "activity.succeeded" in out and "run.completed" in out
    code, out, err = await cli("runs", "show", f"seq-{tag}", "--json", env=runs_env)
    shown = orjson.loads(out)
    assert shown["run"]["state"]["output"] == {"first": 2, "second": 12, "third": 112}
    kinds = [e["kind"] for e in shown["events"]]
    assert kinds.count("activity.requested") == 3 and kinds.count("activity.succeeded") == 3 and "run.requested" in kinds
    assert all(isinstance(e["offset"], int) and isinstance(e["partition"], int) for e in shown["events"])
    code, out, err = await cli("runs", "show", f"seq-{tag}", "--gantt", env=runs_env)
    assert code == 0 and out.startswith("gantt\n"), err
    code, out, err = await cli("runs", "show", "no-such-run", env=runs_env)
    assert code == 1 and "no run 'no-such-run'" in err

    # a new data dir is a new index: rebuilt from the topics, same answer
    fresh = {**runs_env, "LEGATO_DATA_DIR": str(tmp_path / "fresh")}
    code, out, err = await cli("runs", "show", f"seq-{tag}", "--json", env=fresh)
    assert code == 0 and orjson.loads(out)["run"]["state"]["output"] == shown["run"]["state"]["output"], err

    # a tombstone on the changelog (a forgotten run) takes the run out of the index
    await legato.produce(legato.topics.changelog, None, key=f"seq-{tag}".encode())
    code, out, err = await cli("runs", "show", f"seq-{tag}", env=runs_env)
    assert code == 1, out
    await legato.client.cancel(waiting, "test over")


@pytest.fixture(scope="module")
def console(legato, tmp_path_factory):
    """`legato console` as its own process, with its own data dir and port."""
    port = _free_port()
    env = {**legato.env, "LEGATO_DATA_DIR": str(tmp_path_factory.mktemp("console-web")), "LEGATO_LOGLEVEL": "warning"}
    logdir = tmp_path_factory.mktemp("console-logs")
    out, err = open(logdir / "console.out", "wb"), open(logdir / "console.err", "wb")
    proc = subprocess.Popen([legato_executable(), "console", "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while f"legato console: {url}" not in (logdir / "console.out").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"legato console did not start: {(logdir / 'console.err').read_text()}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out.close()
    err.close()


async def test_console_in_a_real_browser(legato, console, tmp_path):
    if not Path(CHROMIUM).exists():
        skip_or_fail("needs Debian's chromium (scripts/test.sh installs it)")
    from playwright.async_api import async_playwright

    tag = uuid.uuid4().hex[:8]
    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    evil = await legato.run("e2e_completion", {"value": XSS}, run_id=f"evil-{tag}")
    assert evil.status == "succeeded"
    done = await legato.run("e2e_sequential", {"start": 5}, run_id=f"seq-{tag}")
    assert done.status == "succeeded"
    long_run = await legato.trigger("e2e_external", {"text": "wait for me"}, run_id=f"long-{tag}", correlation_id=f"order-{tag}")

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))

            # the list: the running run appears without a reload (the page polls)
            await page.goto(console)
            row = page.locator(f'tr[data-run-id="long-{tag}"]')
            await row.wait_for(timeout=30_000)
            assert "running" in await row.inner_text()
            assert await page.locator(f'tr[data-run-id="seq-{tag}"]').count() == 1
            await page.screenshot(path=str(shots / "console-runs.png"), full_page=True)
            late = await legato.trigger("e2e_sequential", {"start": 9}, run_id=f"late-{tag}")  # after the page loaded
            await page.locator(f'tr[data-run-id="{late}"]', has_text="succeeded").wait_for(timeout=30_000)

            # filters narrow it: by status (the select submits itself), then by correlation_id
            await page.select_option("#f-status", "running")
            await page.wait_for_url("**status=running**")
            assert await page.locator(f'tr[data-run-id="seq-{tag}"]').count() == 0
            assert await page.locator(f'tr[data-run-id="long-{tag}"]').count() == 1
            await page.goto(console)
            await page.fill("#f-q", f"order-{tag}")
            await page.click("#f-apply")
            await page.wait_for_url("**q=order-**")
            assert await page.locator("#runs tbody tr[data-run-id]").count() == 1

            # a finished run: steps, timeline, history with offsets
            await page.goto(console + f"run?id=seq-{tag}")
            await page.locator('tr[data-step="third"]').wait_for()
            assert await page.locator("#run-status").inner_text() == "succeeded"
            assert await page.locator(".gantt-bar").count() == 3
            history = await page.locator("#history").inner_text()
            assert f"{legato.topics.completions}/" in history and "run.completed" in history
            # the workflow graph, drawn by the vendored Mermaid, with the path the run took highlighted
            await page.locator("#graph-drawn svg g.node").first.wait_for(timeout=30_000)
            for step in ("first", "second", "third"):
                node = page.locator(f'#graph-drawn svg g.node[id*="-s_{step}-"]')
                assert await node.count() == 1, step
                assert "path_succeeded" in (await node.get_attribute("class")).split(), step
            assert "path_succeeded" in (await page.locator('#graph-drawn svg g.node[id*="-wf_end-"]').get_attribute("class")).split()
            await page.locator("#graph-drawn").screenshot(path=str(shots / "console-graph.png"))
            await page.screenshot(path=str(shots / "console-run.png"), full_page=True)
            await page.goto(console + "workflow?name=e2e_sequential&version=1")  # the definition alone: nothing marked
            await page.locator('#graph-drawn svg g.node[id*="-s_third-"]').wait_for(timeout=30_000)
            assert await page.locator("#graph-drawn svg g.node.path_succeeded").count() == 0

            # escaping: the input and output are shown as text and nothing ran
            await page.goto(console + f"run?id=evil-{tag}")
            shown = await page.locator("#run-input").inner_text() + await page.locator("#run-output").inner_text()
            assert shown.count("<script>window.pwned=1</script>") == 2 and shown.count("<img src=x onerror=") == 2
            assert await page.evaluate("window.pwned") is None
            await page.goto(console + f"?q=evil-{tag}")
            assert await page.evaluate("window.pwned") is None

            # cancel from the page ends the running run with run.cancelled
            await page.goto(console + f"run?id=long-{tag}")
            assert await page.locator("#run-status").inner_text() == "running"
            await page.click("#cancel")
            await page.wait_for_url("**done=cancel**")
            await page.locator("#run-status", has_text="cancelled").wait_for(timeout=30_000)
            events = await legato.run_events(long_run, until=lambda es: any(e.type == "run.cancelled" for e in es))
            assert [e.type for e in events][-1] == "run.cancelled"

            # an approval from the page completes a waiting step: a SignalSent record, then the run goes on
            waiting = await legato.trigger("sig_approval", {}, run_id=f"approve-{tag}")
            step = page.locator('tr[data-step="approval"]')
            for _ in range(30):
                await page.goto(console + f"run?id={waiting}")
                if await step.count() and "waiting" in await step.inner_text():
                    break
                await asyncio.sleep(1)
            assert "waiting" in await step.inner_text()
            assert "approval waits for signal approval" in await page.locator("#waiting").inner_text()
            await page.screenshot(path=str(shots / "console-waiting.png"), full_page=True)
            await page.fill("#signal-name", "approval")
            await page.fill("#signal-data", '{"approved": true}')
            await page.click("#send-signal")
            await page.wait_for_url("**done=signal**")
            signals = await legato.records_of(legato.topics.signals, SignalSent, waiting)
            assert [(s.signal, s.data) for s in signals] == [("approval", {"approved": True})]
            events = await legato.run_events(waiting, until=lambda es: any(e.type == "run.completed" for e in es))
            assert events[-1].type == "run.completed" and events[-1].output == {"approved": True}
            await page.goto(console + f"run?id={waiting}")
            await page.locator("#run-status", has_text="succeeded").wait_for(timeout=30_000)

            # redrive from the page is the same run.redrive_requested record as `legato redrive`
            fatal = await legato.run("e2e_fatal", {}, run_id=f"fatal-{tag}")
            assert fatal.status == "failed"
            for _ in range(30):
                await page.goto(console + f"run?id=fatal-{tag}")
                if await page.locator("#redrive").count():
                    break
                await asyncio.sleep(1)
            doomed = page.locator('#graph-drawn svg g.node[id*="-s_doomed-"]')
            await doomed.wait_for(timeout=30_000)
            assert "path_failed" in (await doomed.get_attribute("class")).split()
            assert "path_succeeded" not in (await page.locator('#graph-drawn svg g.node[id*="-wf_end-"]').get_attribute("class")).split()
            await page.click("#redrive")
            await page.wait_for_url("**done=redrive**")
            records = await legato.read_topic(legato.topics.coordinator)
            asked = [orjson.loads(r.value) for r in records if r.key == f"fatal-{tag}".encode()]
            assert [a["type"] for a in asked if a.get("type") == "run.redrive_requested"] == ["run.redrive_requested"]

            assert all(u.startswith(console) for u in requests), [u for u in requests if not u.startswith(console)]
        finally:
            await browser.close()


async def test_runs_show_and_the_console_say_what_waits_for_a_limit(legato, runs_env, console):
    """Two runs on one key of a limit that grants one request per key (or none, before a limiter runs): one of them at
    least waits; the same with a concurrency key held by a run that never finishes. `legato runs show` and the
    console's run page say what they wait for; a trigger's priority shows too."""
    if not Path(CHROMIUM).exists():
        skip_or_fail("needs Debian's chromium (scripts/test.sh installs it)")
    from playwright.async_api import async_playwright

    tag = uuid.uuid4().hex[:8]
    tenant, customer = f"acme-{tag}", f"customer-{tag}"
    limited = [f"lim-{tag}-{i}" for i in range(2)]
    keyed = [f"key-{tag}-{i}" for i in range(2)]
    for run_id in limited:
        code, out, err = await cli("trigger", "lim_waiting", "--input", orjson.dumps({"tenant": tenant}).decode(), "--run-id", run_id,
                                   "--priority", "4", env=legato.env)
        assert code == 0, err
    for run_id in keyed:
        await legato.trigger("lim_keyed", {"customer": customer}, run_id=run_id)
    step_text, run_text = f"waiting for limit glacial (tenant {tenant})", f"waiting for concurrency key {customer}"

    async def shown(run_ids: list[str], text: str) -> str | None:
        for run_id in run_ids:
            code, out, err = await cli("runs", "show", run_id, env=runs_env)
            if code == 0 and text in out:
                return out
        return None

    out = await _until(lambda: shown(limited, step_text), timeout=60, what=f"`legato runs show` saying {step_text!r}")
    assert "priority 4" in out.splitlines()[0]
    out = await _until(lambda: shown(keyed, run_text), timeout=60, what=f"`legato runs show` saying {run_text!r}")
    assert out.splitlines()[0].endswith(f"status running ({run_text})")

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()

            async def on_page(run_ids: list[str], text: str) -> bool:
                for run_id in run_ids:
                    await page.goto(console + f"run?id={run_id}")
                    if await page.locator("#waiting").count() and text in await page.locator("#waiting").inner_text():
                        return True
                return False

            await _until(lambda: on_page(limited, step_text), timeout=60, what=f"the console saying {step_text!r}")
            assert step_text in await page.locator('tr[data-step="ask"]').inner_text()
            await _until(lambda: on_page(keyed, run_text), timeout=60, what=f"the console saying {run_text!r}")
            assert run_text in await page.locator("#run-limit-wait").inner_text()
        finally:
            await browser.close()
    for run_id in limited + keyed:
        await legato.client.cancel(run_id, "test over")


async def test_schedules_page_in_a_real_browser(legato, console, tmp_path):
    if not Path(CHROMIUM).exists():
        skip_or_fail("needs Debian's chromium (scripts/test.sh installs it)")
    from playwright.async_api import async_playwright

    name = f"page-{uuid.uuid4().hex[:6]}"
    code, out, err = await cli("schedule", "create", name, "--workflow", "e2e_noop", "--every", "2s", "--input", '{"from": "page"}', env=legato.env)
    assert code == 0, err
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1400, "height": 900})
                await page.goto(console)
                await page.click('nav a[href="/schedules"]')

                async def row_with_a_run():
                    await page.goto(console + "schedules")
                    text = await page.locator("#schedules tbody").inner_text()
                    return name in text and f"sched-{name}-" in text and "succeeded" in text
                await _until(row_with_a_run, timeout=90, what="a schedule row with a finished run")
                row = await page.locator("#schedules tbody tr", has_text=name).inner_text()
                assert "every 2s" in row and "active" in row and "e2e_noop" in row
                await page.screenshot(path=str((Path(SCREENSHOTS) if SCREENSHOTS else tmp_path) / "console-schedules.png"), full_page=True)
                await page.locator(f'#schedules a[href^="/run?id=sched-{name}-"]').first.click()
                await page.locator("#run-status", has_text="succeeded").wait_for(timeout=30_000)
            finally:
                await browser.close()
    finally:
        code, _, err = await cli("schedule", "delete", name, env=legato.env)
        assert code == 0, err
