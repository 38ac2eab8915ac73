"""``legato demo``: customer due diligence with the four checks in sequence, then in parallel; a customer on the
review path that waits for a reviewer (the demo plays the reviewer and sends the ``review`` signal); then the
proposal-generation demo, one of whose runs is streamed."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from legato.streams import security
from legato.tools import kafka_local
from legato.streams.config import Settings
from legato.tools.demo_proposal import run_proposal_demo
from legato.topics.client import LegatoClient

EXAMPLES = Path(__file__).resolve().parent.parent / "workflows" / "examples"
CUSTOMER = {"name": "Ada Lovelace", "credit_score": 742, "references": ["Babbage", "Somerville", "De Morgan"]}  # approved
# credit between the thresholds (550-649): due_diligence waits for a reviewer's `review` signal
REVIEW_CUSTOMER = {"name": "Grace Hopper", "credit_score": 612, "references": ["Aiken", "Murray"]}
REVIEW = {"decision": "approve"}
REVIEW_PAUSE_S = 2.0  # how long the reviewer takes
ROUNDS = 3


def main(settings: Settings) -> int:
    kafka_local.ensure_broker(settings.bootstrap)
    # Every demo runs on topics of its own, deleted at the end: the examples it deploys never meet definitions an
    # earlier checkout deployed under the same name@version (a coordinator refuses those), and nothing accumulates.
    settings.prefix = f"{settings.prefix}-demo-{secrets.token_hex(4)}"
    log = tempfile.NamedTemporaryFile(prefix="legato-demo-", suffix=".log", delete=False)
    env = {**os.environ, "LEGATO_BOOTSTRAP": settings.bootstrap, "LEGATO_TOPIC_PREFIX": settings.prefix}
    cmd = [sys.executable, "-m", "legato.streams.cli", "dev", "--workflows", str(EXAMPLES), "--handlers", "legato.handlers.examples.demo", "--handlers", "legato.handlers.examples.proposal"]
    print(f"starting the coordinator and the demo workers (log: {log.name})")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(EXAMPLES.parent.parent))
    try:
        return asyncio.run(_demo(settings, proc))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        asyncio.run(_delete_topics(settings))


async def _delete_topics(settings: Settings) -> None:
    """Delete the demo's own topics (every name under its private prefix)."""
    from legato.streams.admin import delete_topics_under

    try:
        await delete_topics_under(settings.bootstrap, [settings.prefix])
    except Exception as exc:  # the demo's result stands; leftover topics only cost disk
        print(f"could not delete the demo's topics ({exc})", file=sys.stderr)


async def _demo(settings: Settings, proc: subprocess.Popen) -> int:
    async with LegatoClient(settings.bootstrap, settings.prefix, **security.aiokafka_kwargs()) as client:
        deadline = time.monotonic() + 90
        while True:  # the first run also waits for the coordinator to join its group
            if proc.poll() is not None:
                print("the coordinator exited; see its log", file=sys.stderr)
                return 1
            try:
                await client.run("due_diligence", CUSTOMER, timeout=10)
                break
            except (asyncio.TimeoutError, RuntimeError):
                if time.monotonic() > deadline:
                    print("the coordinator did not answer within 90 s", file=sys.stderr)
                    return 1
        results: dict[str, list[float]] = {}
        for workflow in ("due_diligence_sequential", "due_diligence"):
            for i in range(ROUNDS):
                triggered: list[float] = []  # the moment the trigger is on the broker (not the client's set-up before it)

                def mark(line: str) -> None:
                    if line.startswith("triggered") and not triggered:
                        triggered.append(time.perf_counter())

                event = await client.run(workflow, CUSTOMER, timeout=60, progress=mark)
                elapsed = time.perf_counter() - triggered[0]
                if event.status != "succeeded":
                    print(f"{workflow} failed: {event.error}", file=sys.stderr)
                    return 1
                results.setdefault(workflow, []).append(elapsed)
                print(f"  {workflow:<26} run {i + 1}: {elapsed * 1000:7.0f} ms  decision={event.output.get('decision')}")
        print("\nthe review path: a customer with credit between the thresholds waits for a person")
        review_line = await play_reviewer(settings, client)
        if review_line is None:
            return 1
        print("\nproposal generation (the article's hybrid workflow) on a mix of simple and complex requests:")
        proposal_lines = await run_proposal_demo(client, 8)
    sequential = statistics.median(results["due_diligence_sequential"])
    parallel = statistics.median(results["due_diligence"])
    print()
    print("customer due diligence, four checks (median of 3 runs, trigger to terminal event):")
    print(f"  sequential: {sequential * 1000:7.0f} ms")
    print(f"  parallel:   {parallel * 1000:7.0f} ms")
    print(f"  reduction:  {(1 - parallel / sequential) * 100:5.1f} %   (physical limit for four equal checks: 75 %; the article claims 60-80 %)")
    print(review_line)
    print()
    print("\n".join(proposal_lines))
    return 0


async def play_reviewer(settings: Settings, client: LegatoClient) -> str | None:
    """Trigger a run on the review path, wait until it waits for `review`, approve it after a pause, and return a
    summary line (None, after saying why, when the run did not go as it should)."""
    started = time.perf_counter()
    run_id = await client.trigger("due_diligence", REVIEW_CUSTOMER)
    print(f"  triggered {run_id} for {REVIEW_CUSTOMER['name']} (credit {REVIEW_CUSTOMER['credit_score']})")
    waiting = await wait_until_waiting(settings, run_id, "review")
    if waiting is None:
        print(f"run {run_id} never waited for the `review` signal (legato runs show {run_id})", file=sys.stderr)
        return None
    print(f"  {run_id} is waiting: step {waiting} waits for signal 'review' (legato runs show {run_id})")
    await asyncio.sleep(REVIEW_PAUSE_S)
    data = json.dumps(REVIEW)
    print(f"  reviewer: approving {run_id} (legato signal {run_id} review --data '{data}')")
    await client.signal(run_id, "review", REVIEW, signal_id=f"demo-review-{run_id}")
    try:
        event = (await client.wait_for({run_id}, timeout=60))[run_id]
    except asyncio.TimeoutError:
        print(f"run {run_id} did not finish within 60 s of its review", file=sys.stderr)
        return None
    elapsed = time.perf_counter() - started
    decision = (event.output or {}).get("decision") if isinstance(event.output, dict) else None
    if event.status != "succeeded" or decision != "approved":
        print(f"run {run_id} ended {event.status} with decision {decision!r}: {event.error}", file=sys.stderr)
        return None
    print(f"  {run_id}: decision={decision}, {elapsed:.1f} s after its trigger (the reviewer took {REVIEW_PAUSE_S:g} s)")
    return f"  review path: {run_id} waited for the reviewer's `review` signal and was {decision} ({elapsed * 1000:.0f} ms trigger to terminal event)"


async def wait_until_waiting(settings: Settings, run_id: str, signal_name: str, timeout: float = 60.0) -> str | None:
    """The key of the run's step that waits for ``signal_name``, read from the coordinator's changelog (as
    `legato runs show` does) once it waits; None when it has not within ``timeout`` s or the run ended."""
    from legato.streams.runs import load_run

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = await load_run(settings.bootstrap, settings.prefix, run_id, timeout=10)
        if state is not None:
            if state.status != "running":
                return None
            for step in state.steps.values():
                if step.status == "waiting" and step.signal == signal_name:
                    return step.key
        await asyncio.sleep(0.3)
    return None
