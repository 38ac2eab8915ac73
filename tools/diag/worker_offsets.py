"""Does a worker group's committed offset reach the end of its request topic once every request is answered?

Transactional producers (several, interleaved, one in four transactions aborted: what coordinators write) put
requests on ``<prefix>.requests.e2e_echo``; one ``legato worker`` answers them; once every committed request has
its completion and the worker has had time to commit, this prints, per partition, the group's committed offset, the
end offset and the offset after the last request answered.

    LEGATO_BOOTSTRAP=localhost:19310 .venv/bin/python -m legato.tools.diag.worker_offsets --requests 400
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from legato.streams import kafka_io
from legato.topics import codec
from legato.topics.models import ActivityCompleted, ActivityRequested
from legato.topics.names import Topics

ACTIVITY = "e2e_echo"


async def produce_requests(bootstrap: str, topics: Topics, n: int, producers: int, partitions: int, seed: int = 7) -> tuple[dict[int, int], int]:
    """Write at least ``n`` committed requests (and aborted ones between them); returns the highest committed offset
    per partition and the number of committed requests."""
    rng = random.Random(seed)
    prods = [AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"{topics.prefix}-diag-{seed}-{i}", enable_idempotence=True) for i in range(producers)]
    for p in prods:
        await p.start()
    last: dict[int, int] = {}
    sent = 0
    try:
        while sent < n:
            p = rng.choice(prods)
            commit = rng.random() > 0.25
            async with p.transaction() if commit else _aborting(p):
                for _ in range(rng.randint(1, 4)):
                    part = rng.randrange(partitions)
                    rid = uuid.uuid4().hex
                    req = ActivityRequested(request_id=f"{rid}/s/1", run_id=rid, step_id="s", activity=ACTIVITY, attempt=1,
                                            input={"value": sent}, requested_ms=int(time.time() * 1000), run_started_ms=int(time.time() * 1000))
                    md = await (await p.send(topics.requests(ACTIVITY), codec.dumps(req), key=rid.encode(), partition=part))
                    if commit:
                        last[part] = max(last.get(part, -1), md.offset)
                        sent += 1
            await asyncio.sleep(rng.random() * 0.02)
    finally:
        for p in prods:
            await p.stop()
    return last, sent


class _aborting:
    def __init__(self, producer: AIOKafkaProducer):
        self.p = producer

    async def __aenter__(self):
        await self.p.begin_transaction()

    async def __aexit__(self, *exc):
        await self.p.abort_transaction()


async def answered(bootstrap: str, topics: Topics, n: int, timeout: float) -> tuple[int, int]:
    """Read completions until ``n`` distinct requests are answered (or ``timeout``): (answered, completions)."""
    c = AIOKafkaConsumer(topics.completions, bootstrap_servers=bootstrap, auto_offset_reset="earliest", isolation_level="read_committed")
    await c.start()
    seen: set[str] = set()
    total = 0
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < n and time.monotonic() < deadline:
            for recs in (await c.getmany(timeout_ms=500)).values():
                for r in recs:
                    try:
                        seen.add(codec.decode(ActivityCompleted, r.value).request_id)
                        total += 1
                    except Exception:
                        pass
    finally:
        await c.stop()
    return len(seen), total


async def committed_and_end(bootstrap: str, group: str, topic: str) -> dict[int, tuple[int | None, int]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in await kafka_io.partitions_of(c, topic)]
        ends = await c.end_offsets(tps)
    finally:
        await c.stop()
    return {tp.partition: (offsets[tp].offset if tp in offsets else None, ends[tp]) for tp in tps}


async def topics_exist(bootstrap: str, names: list[str], timeout: float = 120.0) -> None:
    """Wait until the worker has created ``names`` (it creates its topics at start)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while not set(names) <= set(await admin.list_topics()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {names} not created within {timeout:g} s")
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--producers", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--commit-interval", default=None, help="the worker's LEGATO_COMMIT_INTERVAL")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds to wait after the last answer")
    args = ap.parse_args()
    bootstrap = os.environ.get("LEGATO_BOOTSTRAP", "localhost:9092")
    prefix = f"diag{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    env = {**os.environ, "LEGATO_TOPIC_PREFIX": prefix, "LEGATO_PARTITIONS": str(args.partitions), "LEGATO_BOOTSTRAP": bootstrap}
    if args.commit_interval:
        env["LEGATO_COMMIT_INTERVAL"] = args.commit_interval
    log = Path(f"/tmp/{prefix}-worker.log")
    exe = str(Path(sys.executable).with_name("legato"))
    worker = subprocess.Popen([exe, "worker", "--handlers", "tests.integration.e2e_handlers", "--activity", ACTIVITY],
                              env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        await topics_exist(bootstrap, [topics.requests(ACTIVITY), topics.completions])
        last, sent = await produce_requests(bootstrap, topics, args.requests, args.producers, args.partitions)
        got, total = await answered(bootstrap, topics, sent, 120)
        await asyncio.sleep(args.settle)
        rows = await committed_and_end(bootstrap, f"{prefix}-worker-{ACTIVITY}", topics.requests(ACTIVITY))
        print(f"answered {got}/{sent} ({total} completions)")
        for p, (committed, end) in rows.items():
            print(f"partition {p}: committed {committed} end {end} after last request {last.get(p, -1) + 1} behind_end {None if committed is None else end - committed}")
    finally:
        worker.terminate()
        worker.wait(15)


if __name__ == "__main__":
    asyncio.run(main())
