"""An activity worker written with nothing but the topic contract and kcat: no Python, no Legato code.

The workflow e2e_external uses the activity `external_upper`, which no Python handler registers. The test reads
the request from `<prefix>.requests.external_upper` with `kcat -C`, builds the completion JSON by hand and
produces it to `<prefix>.completions` with `kcat -P`.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import uuid
import zlib

import pytest

from legato.streams.kafka_io import partition_for
from tests.conftest import skip_or_fail

pytestmark = pytest.mark.integration

PARTITIONS = 8
KCAT_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def kcat() -> str:
    path = shutil.which("kcat")
    if path is None:
        try:
            subprocess.run(["apt-get", "install", "-y", "-qq", "kcat"], check=True, capture_output=True, timeout=180)
        except (OSError, subprocess.SubprocessError) as exc:
            skip_or_fail(f"kcat is not installed and `apt-get install -y -qq kcat` failed: {exc}")
        path = shutil.which("kcat")
        if path is None:
            skip_or_fail("kcat is not installed and apt-get did not provide it")
    assert path is not None
    return path


def murmur2_partition(key: str) -> int:
    """The partition aiokafka and the Java client pick for ``key`` (the coordinator's own lookup)."""
    return partition_for(key.encode(), PARTITIONS)


def crc32_partition(key: str) -> int:
    """librdkafka's default `consistent_random` partitioner for a non-empty key: CRC32 % partitions."""
    return zlib.crc32(key.encode()) % PARTITIONS


async def kcat_run(kcat: str, *args: str, stdin: bytes | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        kcat, *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), KCAT_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"kcat {' '.join(args)} did not finish in {KCAT_TIMEOUT_S}s") from None
    assert proc.returncode == 0, f"kcat {' '.join(args)} exited {proc.returncode}: {err.decode(errors='replace')}"
    return out.decode("utf-8", errors="replace")  # other tests put non-UTF-8 garbage on shared topics


def payload_of(envelope: dict) -> dict:
    """The JSON object in a kcat -J envelope, or {} for anything else (other tests' malformed records)."""
    try:
        value = json.loads(envelope.get("payload") or "")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def kcat_consume(kcat: str, bootstrap: str, topic: str, match, timeout: float = 30.0) -> list[dict]:
    """Read ``topic`` from the beginning with kcat (-J envelopes) until ``match(envelopes)`` is non-empty."""
    deadline = time.monotonic() + timeout
    while True:
        out = await kcat_run(kcat, "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-J", "-q")
        envelopes = [json.loads(line) for line in out.splitlines() if line.strip()]
        found = match(envelopes)
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing matched on {topic} after {timeout}s ({len(envelopes)} messages)")
        await asyncio.sleep(0.3)  # poll interval between kcat reads


def run_id_for(variant: str) -> str:
    """A run id for the variant; for `consistent_random` one whose CRC32 partition differs from murmur2's."""
    while True:
        run_id = f"ext-{variant}-{uuid.uuid4()}"
        if variant != "consistent_random" or crc32_partition(run_id) != murmur2_partition(run_id):
            return run_id


@pytest.mark.parametrize(
    "variant",
    [
        "murmur2_random",  # keyed by run_id with Java/aiokafka's partitioner: lands on the run's partition
        "consistent_random",  # kcat's default partitioner (CRC32): a wrong partition, the coordinator re-keys it
        "no_key",  # no key at all: a random partition, the coordinator re-keys it by the record's run_id
    ],
)
async def test_kcat_worker_completes_an_activity(legato, kcat, variant):
    bootstrap = legato.bootstrap
    run_id = run_id_for(variant)
    await legato.trigger("e2e_external", {"text": "hello from kcat"}, run_id=run_id)

    # 1. The request, as any worker sees it.
    def requests_of_run(envelopes):
        return [e for e in envelopes if payload_of(e).get("run_id") == run_id]

    envelopes = await kcat_consume(kcat, bootstrap, legato.topics.requests("external_upper"), requests_of_run)
    assert len(envelopes) == 1, envelopes
    envelope = envelopes[0]
    assert envelope["key"] == run_id, "requests are keyed by run_id"
    assert envelope["partition"] == murmur2_partition(run_id)
    request = json.loads(envelope["payload"])
    assert request["activity"] == "external_upper"
    assert request["step_id"] == "shout"
    assert request["attempt"] == 1
    assert request["input"] == {"text": "hello from kcat"}
    assert request["deadline"] > time.time() * 1000

    # 2. The completion, built by hand from the contract.
    completion = {
        "request_id": request["request_id"],
        "run_id": request["run_id"],
        "step_id": request["step_id"],
        "attempt": request["attempt"],
        "status": "succeeded",
        "output": {"text": request["input"]["text"].upper()},
        "confidence": 0.99,
        "cost": {"usd": 0.0005, "model": "kcat"},
    }
    args = ["-P", "-b", bootstrap, "-t", legato.topics.completions]
    if variant != "no_key":
        args += ["-k", run_id]
    if variant == "murmur2_random":
        args += ["-X", "topic.partitioner=murmur2_random"]
    await kcat_run(kcat, *args, stdin=json.dumps(completion).encode() + b"\n")

    # 3. The run finishes with that output.
    event = (await legato.wait_for({run_id}, timeout=60))[run_id]
    assert event.status == "succeeded", event
    assert event.output == {"shouted": "HELLO FROM KCAT"}
    assert event.cost is not None and event.cost["usd"] == pytest.approx(0.0005)
    await legato.assert_single_terminal(run_id)

    # Where did the hand-made completion land? (For consistent_random: not on the run's partition.)
    def completions_of_run(envelopes):
        return [e for e in envelopes if payload_of(e).get("run_id") == run_id]

    landed = await kcat_consume(kcat, bootstrap, legato.topics.completions, completions_of_run)
    if variant == "murmur2_random":
        assert [e["partition"] for e in landed] == [murmur2_partition(run_id)]
    elif variant == "consistent_random":
        # kcat -C prints partitions in no particular order: compare as a set. The original on kcat's CRC32
        # partition, and the coordinator's re-keyed copy on the run's murmur2 partition.
        assert crc32_partition(run_id) != murmur2_partition(run_id)
        assert sorted(e["partition"] for e in landed) == sorted([crc32_partition(run_id), murmur2_partition(run_id)]), landed
    else:
        assert murmur2_partition(run_id) in [e["partition"] for e in landed], "the coordinator re-keyed the completion"


async def test_the_confluent_kafka_worker_of_the_docs_completes_an_activity(legato):
    """The confluent-kafka worker printed in docs/handlers/other-languages.md, run as printed (only the bootstrap,
    the topic prefix and the endless loop adapted to the test): it answers a run of e2e_external."""
    import re
    import threading

    from tests.integration.conftest import REPO_ROOT

    page = (REPO_ROOT / "docs" / "handlers" / "other-languages.md").read_text(encoding="utf-8")
    code = re.findall(r"```python\n(.*?)```", page, re.S)[0]
    prefix = legato.topics.requests("x").rsplit(".requests.", 1)[0]
    adapted = (code.replace('"localhost:9092"', repr(legato.bootstrap))
                   .replace('f"legato.', f'f"{prefix}.').replace('"legato.', f'"{prefix}.')
                   .replace('f"my-', f'f"{prefix}-my-')
                   .replace("while True:", "while not STOP.is_set():"))
    assert adapted.count(prefix) == 3 and "while not STOP.is_set():" in adapted, adapted
    adapted += "\nconsumer.close()\n"
    stop = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            exec(compile(adapted, "docs/handlers/other-languages.md", "exec"), {"STOP": stop})  # the page's own code
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        event = await legato.run("e2e_external", {"text": "hello from confluent-kafka"}, run_id=f"ext-ck-{uuid.uuid4()}", timeout=60)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
    assert not errors, errors
    assert event.status == "succeeded" and event.output == {"shouted": "HELLO FROM CONFLUENT-KAFKA"}, event
