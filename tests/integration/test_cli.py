"""The `legato` command line as a user runs it: separate processes, exit codes, printed JSON."""
from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from tests.integration.conftest import REPO_ROOT, WORKFLOWS_DIR, legato_executable
from legato.topics.models import RunEvent

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 90.0


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        legato_executable(), *args, cwd=REPO_ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"legato {' '.join(args)} did not finish in {CLI_TIMEOUT_S}s") from None
    return proc.returncode, out.decode(), err.decode()


BAD_DURATION = """\
name: bad_duration
steps:
  - id: first
    activity: noop
  - id: second
    activity: noop
    timeout: soon
"""

BAD_UNKNOWN_STEP = """\
name: bad_ref
steps:
  - id: first
    activity: noop
    input: {x: "${ steps.nowhere.output }"}
"""


async def test_validate_good_file(tmp_path):
    good = WORKFLOWS_DIR / "e2e_sequential.yaml"
    code, out, err = await cli("validate", str(good))
    assert code == 0, err
    assert out.strip() == f"ok: {good}: workflow e2e_sequential v1, 3 steps, activities: e2e_add"
    assert err == ""


@pytest.mark.parametrize(
    "text, path, reason",
    [
        (BAD_DURATION, "steps[1].timeout", "not a duration: 'soon'"),
        (BAD_UNKNOWN_STEP, "steps[0].input", "refers to unknown step 'nowhere'"),
        ("name: [unclosed\n", "<document>", "not valid YAML"),
    ],
    ids=["bad-duration", "unknown-step", "not-yaml"],
)
async def test_validate_bad_file_names_file_and_path(tmp_path, text, path, reason):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text, encoding="utf-8")
    code, out, err = await cli("validate", str(bad))
    assert code == 1, (out, err)
    assert out == ""
    assert err.startswith(f"invalid: {bad}: {path}: "), err
    assert reason in err, err


async def test_validate_mixed_files_reports_each(tmp_path):
    good = WORKFLOWS_DIR / "e2e_loop.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_UNKNOWN_STEP, encoding="utf-8")
    code, out, err = await cli("validate", str(good), str(bad))
    assert code == 1
    assert out.startswith(f"ok: {good}: workflow e2e_loop")
    assert f"invalid: {bad}: steps[0].input" in err


async def test_trigger_wait_prints_the_terminal_event(legato):
    run_id = f"cli-{uuid.uuid4()}"
    code, out, err = await cli("trigger", "e2e_sequential", "--input", '{"start": 2}', "--run-id", run_id, "--wait", "--timeout", "60", env=legato.env)
    assert code == 0, (out, err)
    event = RunEvent.model_validate(orjson.loads(out.strip().splitlines()[-1]))
    assert event.type == "run.completed"
    assert event.run_id == run_id
    assert event.output == {"first": 3, "second": 13, "third": 113}
    assert f"triggered e2e_sequential run {run_id}" in err  # progress goes to stderr, the event alone to stdout
    assert len(out.strip().splitlines()) == 1
    await legato.assert_single_terminal(run_id)


async def test_trigger_wait_exits_1_when_the_run_fails(legato):
    code, out, err = await cli("trigger", "e2e_fatal", "--wait", "--timeout", "60", env=legato.env)
    assert code == 1, (out, err)
    event = RunEvent.model_validate(orjson.loads(out.strip().splitlines()[-1]))
    assert event.type == "run.failed"
    assert event.error is not None and event.error.type == "E2EFatal"


async def test_trigger_without_wait_prints_the_run_id(legato):
    code, out, err = await cli("trigger", "e2e_noop", "--input", '{"fire": "and forget"}', env=legato.env)
    assert code == 0, err
    run_id = out.strip()
    uuid.UUID(run_id)
    event = (await legato.wait_for({run_id}))[run_id]
    assert event.status == "succeeded"
    assert event.output == {"fire": "and forget"}


@pytest.mark.parametrize("bad_input", ["{not json", "[1, 2]"])
async def test_trigger_refuses_bad_input(legato, bad_input):
    code, out, err = await cli("trigger", "e2e_noop", "--input", bad_input, env=legato.env)
    assert code == 2
    assert out == ""
    assert "--input" in err


async def test_cancel_ends_a_waiting_run_with_one_cancelled_event(legato):
    run_id = f"cancel-{uuid.uuid4()}"
    # external_upper has no worker here: the run waits in its step until it is cancelled
    code, out, err = await cli("trigger", "e2e_external", "--input", '{"text": "hi"}', "--run-id", run_id, env=legato.env)
    assert code == 0, err
    code, out, err = await cli("cancel", run_id, "--reason", "customer withdrew", "--wait", "--timeout", "30", env=legato.env)
    assert code == 0, (out, err)
    event = RunEvent.model_validate(orjson.loads(out.strip()))
    assert (event.type, event.status) == ("run.cancelled", "cancelled")
    assert event.error is not None and event.error.type == "cancelled" and "customer withdrew" in event.error.message
    await legato.assert_single_terminal(run_id)
    # a second cancel finds the run finished: nothing changes, --wait prints the same terminal event
    code, out, err = await cli("cancel", run_id, "--wait", "--timeout", "30", env=legato.env)
    assert code == 0
    assert RunEvent.model_validate(orjson.loads(out.strip())).error.message == event.error.message
    await legato.assert_single_terminal(run_id)


async def test_cancel_wait_exits_1_for_a_run_that_succeeded(legato):
    run_id = f"done-{uuid.uuid4()}"
    code, out, err = await cli("trigger", "e2e_noop", "--input", "{}", "--run-id", run_id, "--wait", "--timeout", "60", env=legato.env)
    assert code == 0, err
    code, out, err = await cli("cancel", run_id, "--wait", "--timeout", "30", env=legato.env)
    assert code == 1
    assert RunEvent.model_validate(orjson.loads(out.strip())).status == "succeeded"
    await legato.assert_single_terminal(run_id)
