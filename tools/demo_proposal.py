"""The proposal-generation demo: workflows/examples/proposal.yaml on a mix of simple and complex requests.

``await run_proposal_demo(client, n_runs)`` returns printable lines: per path (fast / complex) the number of
runs, the mean duration (trigger to terminal event, as the coordinator measured it), the mean number of
quality-loop iterations and the mean cost, and how many progress chunks of one run's draft arrived through
``LegatoClient.stream`` (the writing steps stream their draft). The demo handlers (handlers/proposal.py) are seeded
from the request, so the same requests give the same paths, iterations and costs on every machine.
"""
from __future__ import annotations

import asyncio
import statistics
from typing import Any

from legato.topics.client import LegatoClient
from legato.topics.models import ProgressReported, RunEvent

WORKFLOW = "proposal"
CONCURRENT_RUNS = 4
STREAMED = 1  # the request whose progress chunks are read live (a complex one: its synthesis streams the draft)

SIMPLE_REQUESTS = [
    ("Acme", "a one-page landing site", ["copy"]),
    ("Initech", "refresh the logo colours", []),
    ("Hooli", "a short market note", ["sources"]),
]
COMPLEX_REQUESTS = [
    ("Globex", "migrate the billing platform to a new region with zero downtime and audited data residency",
     ["data residency", "zero downtime", "audit trail", "rollback plan", "SLA 99.95"]),
    ("Umbrella", "a multi-country rollout of the claims assistant with regulator sign-off and staff training",
     ["regulatory approval", "training", "localisation", "accessibility", "on-call rota"]),
    ("Soylent", "replace the order pipeline and integrate three suppliers with a phased cut-over",
     ["supplier APIs", "phased cut-over", "load testing", "security review"]),
]


def requests(n_runs: int) -> list[dict[str, Any]]:
    """``n_runs`` requests, alternating simple and complex (each one distinct, so each has its own seed)."""
    out = []
    for i in range(n_runs):
        pool = SIMPLE_REQUESTS if i % 2 == 0 else COMPLEX_REQUESTS
        client, text, reqs = pool[(i // 2) % len(pool)]
        out.append({"id": f"demo-{i + 1}", "client": client, "request": text, "requirements": reqs})
    return out


async def run_proposal_demo(client: LegatoClient, n_runs: int) -> list[str]:
    """Run proposal.yaml ``n_runs`` times (at most CONCURRENT_RUNS at once) and summarise per path."""
    slots = asyncio.Semaphore(CONCURRENT_RUNS)
    streamed: list[str] = []

    async def one(i: int, payload: dict[str, Any]) -> RunEvent:
        async with slots:
            if i != STREAMED:
                return await client.run(WORKFLOW, payload, timeout=300)
            run_id = await client.trigger(WORKFLOW, payload)
            chunks, event = await read_stream(client, run_id)
            streamed.append(stream_line(run_id, payload, chunks))
            return event

    events = await asyncio.gather(*(one(i, p) for i, p in enumerate(requests(n_runs))))
    return summarise(events) + streamed


async def read_stream(client: LegatoClient, run_id: str, timeout: float = 300) -> tuple[list[ProgressReported], RunEvent]:
    """Every progress chunk of the run as it comes, then its terminal event (``LegatoClient.stream``)."""
    chunks: list[ProgressReported] = []
    async for item in client.stream(run_id, timeout=timeout):
        if isinstance(item, ProgressReported):
            chunks.append(item)
        else:
            return chunks, item
    raise RuntimeError(f"the stream of {run_id} ended without a terminal event")


def stream_line(run_id: str, payload: dict[str, Any], chunks: list[ProgressReported]) -> str:
    steps = sorted({c.step_id for c in chunks})
    text = "".join(str(c.chunk) for c in chunks)
    return (f"  streamed: {len(chunks)} progress chunks of run {run_id} ({payload['client']}, steps {', '.join(steps) or '-'}) "
            f"arrived through LegatoClient.stream before its terminal event: {text!r}")


def summarise(events: list[RunEvent]) -> list[str]:
    lines = [f"complex proposal generation ({WORKFLOW}.yaml), {len(events)} runs:"]
    failed = [e for e in events if e.status != "succeeded"]
    by_path: dict[str, list[RunEvent]] = {}
    for event in events:
        if event.status == "succeeded":
            by_path.setdefault(str((event.output or {}).get("path", "?")), []).append(event)
    lines.append(f"  {'path':<8} {'runs':>4} {'mean ms':>9} {'loop iter':>9} {'usd':>9} {'tokens':>8}")
    for path in ("fast", "complex", *sorted(set(by_path) - {"fast", "complex"})):
        runs = by_path.get(path, [])
        if not runs:
            lines.append(f"  {path:<8} {0:>4} {'-':>9} {'-':>9} {'-':>9} {'-':>8}")
            continue
        duration = statistics.mean(e.duration_ms or 0 for e in runs)
        iterations = statistics.mean(float((e.output or {}).get("iterations") or 0) for e in runs)
        usd = statistics.mean(float((e.cost or {}).get("usd", 0)) for e in runs)
        tokens = statistics.mean(int((e.cost or {}).get("tokens_in", 0)) + int((e.cost or {}).get("tokens_out", 0)) for e in runs)
        lines.append(f"  {path:<8} {len(runs):>4} {duration:>9.0f} {iterations:>9.2f} {usd:>9.4f} {tokens:>8.0f}")
    for event in failed:
        lines.append(f"  failed run {event.run_id}: {event.error.type if event.error else '?'}: {event.error.message if event.error else ''}")
    return lines
