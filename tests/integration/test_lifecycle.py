"""Run lifecycle on the real broker (issue 11): definitions deployed while the coordinator runs, runs pinned to theirs.

These use the session's coordinator and worker (conftest ``legato``); each test deploys workflows of its own name.
"""
from __future__ import annotations

import asyncio
import textwrap
import uuid

import pytest

from legato.topics.models import ActivityRequested, RunEvent
from tests.integration.conftest import REPO_ROOT, Legato, legato_executable

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 90.0


async def cli(legato: Legato, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(legato_executable(), *args, cwd=REPO_ROOT, env=legato.env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    return proc.returncode, out.decode(), err.decode()


async def probe(legato: Legato, key: str) -> dict:
    """What the e2e handlers recorded under ``key`` in the worker process (``sem_probe``)."""
    event = await legato.run("sem_probe", {"key": key}, timeout=30)
    assert event.status == "succeeded", event
    return event.output


async def deploy(legato: Legato, name: str, text: str) -> None:
    path = legato.workdir / f"{name}.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    code, out, err = await cli(legato, "deploy", str(path))
    assert code == 0, err


async def test_a_run_keeps_its_version_when_a_new_one_is_deployed_mid_run(legato: Legato):
    """v1 is deployed while the coordinator runs (no restart); a v1 run waits on a slow step while v2 (other steps) is
    deployed; it finishes with v1's steps. A new trigger gets v2, and ``version: 1`` still starts v1 (``LegatoClient.run(...,
    version=1)`` and ``legato trigger --version 1``)."""
    name = f"pin_{uuid.uuid4().hex[:8]}"
    await deploy(legato, f"{name}_v1", f"""\
        name: {name}
        version: 1
        steps:
          - {{id: slow, activity: e2e_sleep, input: {{seconds: 3}}}}
          - {{id: last, activity: e2e_echo, input: {{made_by: v1}}}}
        output: "steps.last.output"
        """)
    first = await legato.trigger(name)
    started = await legato.run_events(first, until=lambda events: any(e.type == "run.started" for e in events))
    assert [e.version for e in started if e.type == "run.started"] == [1]
    await deploy(legato, f"{name}_v2", f"""\
        name: {name}
        version: 2
        steps:
          - {{id: only_in_v2, activity: e2e_echo, input: {{made_by: v2}}}}
        output: "steps.only_in_v2.output"
        """)
    done = (await legato.wait_for({first}))[first]
    assert (done.status, done.output, done.version) == ("succeeded", {"made_by": "v1"}, 1), done

    latest = await legato.run(name)
    assert (latest.status, latest.output, latest.version) == ("succeeded", {"made_by": "v2"}, 2), latest
    assert legato.client is not None
    pinned = await legato.client.run(name, version=1, timeout=60.0)
    assert (pinned.status, pinned.output, pinned.version) == ("succeeded", {"made_by": "v1"}, 1), pinned
    code, out, err = await cli(legato, "trigger", name, "--version", "1", "--wait", "--timeout", "60")
    assert code == 0, err
    by_cli = RunEvent.model_validate_json(out)
    assert (by_cli.status, by_cli.output, by_cli.version) == ("succeeded", {"made_by": "v1"}, 1), by_cli
    missing = await legato.client.run(name, version=9, timeout=60.0)
    assert missing.status == "failed" and missing.error.message == f"workflow {name!r} has no version 9 (deployed: 1, 2)", missing


async def test_a_finished_run_is_forgotten_after_its_retention_and_its_run_id_starts_a_new_run(legato: Legato):
    """``retention: 2s``: a trigger with the run's run_id sent as soon as the run has finished (well inside the 2 s)
    starts nothing; then the run's state leaves the changelog (a tombstone keyed by its run_id), and a trigger with the
    same run_id starts a new run."""
    name = f"kept_{uuid.uuid4().hex[:8]}"
    await deploy(legato, name, f"""\
        name: {name}
        retention: 2s
        steps:
          - {{id: only, activity: e2e_echo, input: {{n: "${{ input.n }}"}}}}
        output: "steps.only.output"
        """)
    run_id = f"{name}-run"
    first = await legato.run(name, {"n": 1}, run_id=run_id)
    assert first.status == "succeeded" and first.output == {"n": 1}, first
    await legato.trigger(name, {"n": 99}, run_id=run_id)  # inside the idempotency window: a duplicate
    key = run_id.encode()
    changelog = await legato.read_topic(legato.topics.changelog, until=lambda rs: any(r.key == key and r.value is None for r in rs), timeout=30.0)
    mine = [r for r in changelog if r.key == key]
    assert mine[-1].value is None and all(r.value is not None for r in mine[:-1]), mine
    kept = await legato.run_events(run_id)
    assert [(e.type, e.output) for e in kept] == [("run.started", None), ("run.completed", {"n": 1})], "the duplicate trigger started a run"

    second = await legato.run(name, {"n": 2}, run_id=run_id)
    assert second.status == "succeeded" and second.output == {"n": 2}, second
    started = [e for e in await legato.run_events(run_id) if e.type == "run.started"]
    assert len(started) == 2


async def test_a_failed_run_is_redriven_from_its_failed_step_and_completes_without_running_step_one_again(legato: Legato):
    """Step 2 of 3 fails with a non-retryable error (its handler is broken until the test "fixes the worker" by
    creating a file); ``legato redrive --wait`` then resumes it: the worker ran step 1 once (its own call count, read
    back through ``sem_probe``; the coordinator requested it once), and the run has one ``run.failed``, one
    ``run.redriven`` and one ``run.completed``, the last two with ``redrives: 1``."""
    name = f"redrive_{uuid.uuid4().hex[:8]}"
    fixed = legato.workdir / f"{name}.fixed"
    await deploy(legato, name, f"""\
        name: {name}
        steps:
          - {{id: one, activity: e2e_counted, input: {{key: "${{ input.key }}", value: 1}}}}
          - {{id: two, activity: e2e_until_fixed, input: {{fixed: "${{ input.fixed }}"}}, retry: {{max_attempts: 3}}}}
          - {{id: three, activity: e2e_echo, input: {{done: true}}}}
        output: "{{'one': steps.one.output.call, 'two': steps.two.output, 'three': steps.three.output}}"
        """)
    run_id = f"{name}-run"
    failed = await legato.run(name, {"key": run_id, "fixed": str(fixed)}, run_id=run_id)
    assert failed.status == "failed" and failed.error.type == "E2EBroken", failed

    fixed.touch()
    code, out, err = await cli(legato, "redrive", run_id, "--reason", "worker fixed", "--wait", "--timeout", "60")
    assert code == 0, err
    done = RunEvent.model_validate_json(out)
    assert (done.type, done.redrives, done.output) == ("run.completed", 1, {"one": 1, "two": {"fixed": True}, "three": {"done": True}}), done
    events = await legato.run_events(run_id)
    assert [(e.type, e.redrives) for e in events] == [("run.started", None), ("run.failed", None), ("run.redriven", 1), ("run.completed", 1)]
    assert (await probe(legato, run_id))["calls"] == 1, "the worker ran step one again"
    requests = await legato.records_of(legato.topics.requests("e2e_counted"), ActivityRequested, run_id)
    assert [(r.step_id, r.attempt) for r in requests] == [("one", 1)], requests
    requests = await legato.records_of(legato.topics.requests("e2e_until_fixed"), ActivityRequested, run_id)
    assert [r.attempt for r in requests] == [1, 2], "not retried before the redrive (non-retryable), attempts continue after it"

    code, out, err = await cli(legato, "redrive", run_id, "--wait")
    assert code == 1 and "the run is succeeded: only a failed run can be redriven" in err, err


async def test_a_fork_from_step_two_runs_steps_two_and_three_only(legato: Legato):
    """``legato fork RUN --from two --input …``: a new run copies step one's output (its handler was called once) and
    runs steps two and three with the new input; its events carry ``forked_from``."""
    name = f"fork_{uuid.uuid4().hex[:8]}"
    await deploy(legato, name, f"""\
        name: {name}
        steps:
          - {{id: one, activity: e2e_counted, input: {{key: "${{ input.key }}", value: 1}}}}
          - {{id: two, activity: e2e_echo, input: {{prompt: "${{ input.prompt }}"}}}}
          - {{id: three, activity: e2e_counted, input: {{key: "${{ input.key }}-three", value: 3}}}}
        output: "{{'one': steps.one.output.call, 'two': steps.two.output, 'three': steps.three.output.call}}"
        """)
    source = f"{name}-src"
    first = await legato.run(name, {"key": source, "prompt": "old"}, run_id=source)
    assert first.status == "succeeded" and first.output == {"one": 1, "two": {"prompt": "old"}, "three": 1}, first

    new_run = f"{name}-fork"
    code, out, err = await cli(legato, "fork", source, "--from", "two", "--input", f'{{"key": "{source}", "prompt": "new"}}', "--run-id", new_run,
                               "--wait", "--timeout", "60")
    assert code == 0, err
    forked = RunEvent.model_validate_json(out)
    assert (forked.run_id, forked.type, forked.forked_from) == (new_run, "run.completed", {"run_id": source, "step": "two"}), forked
    assert forked.output == {"one": 1, "two": {"prompt": "new"}, "three": 2}, forked
    assert forked.cost["usd"] == 0.02  # step one's cost copied, step three's paid again
