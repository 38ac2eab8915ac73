"""Definitions on the real broker: `legato deploy`, `legato definitions`, and a DefinitionTable following the topic.

No coordinator or worker is needed: each test module gets its own topic prefix and creates the topics itself.
"""
from __future__ import annotations

import asyncio
import os
import textwrap
import time
import uuid

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from legato.streams.admin import ensure_topics
from legato.streams.definitions import DefinitionTable, DeployRefused, deploy, deploy_files, read_files
from legato.topics import codec
from legato.topics.client import LegatoClient
from legato.topics.models import DeadLetter, DefinitionDeployed
from legato.topics.names import Topics
from legato.workflows.catalog import source_sha256
from tests.integration.conftest import REPO_ROOT, legato_executable

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 90.0

V1 = textwrap.dedent("""\
    name: greet
    version: 1
    steps:
      - {id: hello, activity: say}
    """)
V1_EDITED = V1.replace("say", "shout")
V2 = V1_EDITED.replace("version: 1", "version: 2")


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"def{uuid.uuid4().hex[:10]}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def topics(kafka_bootstrap: str, prefix: str) -> Topics:
    t = Topics(prefix)
    await ensure_topics(kafka_bootstrap, t, [], 8)
    return t


@pytest.fixture
def env(kafka_bootstrap: str, prefix: str) -> dict[str, str]:
    return {**os.environ, "LEGATO_BOOTSTRAP": kafka_bootstrap, "LEGATO_TOPIC_PREFIX": prefix}


async def cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(legato_executable(), *args, cwd=REPO_ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"legato {' '.join(args)} did not finish in {CLI_TIMEOUT_S}s") from None
    return proc.returncode, out.decode(), err.decode()


async def records(bootstrap: str, topic: str) -> list:
    """Every committed record of ``topic`` up to its end now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, isolation_level="read_committed",
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or await _partitions(consumer, topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out = []
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                out += batch
        return out
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic) or set()


async def until(predicate, timeout: float, step: float = 0.01) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(step)
    return time.monotonic() - started


async def test_the_definitions_topic_is_created_up_front_and_compacted(topics, kafka_bootstrap):
    """``ensure_topics`` (what every coordinator and ``legato deploy`` run first) creates ``<prefix>.definitions``
    compacted: the latest record per ``<name>@<version>`` is kept for good."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert topics.definitions in set(await admin.list_topics())
        resource = (await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topics.definitions)]))[0].resources[0]
    finally:
        await admin.close()
    config = {entry[0]: entry[1] for entry in resource[4]}
    assert config["cleanup.policy"] == "compact", config


async def test_deploy_redeploy_and_conflict(tmp_path, env, topics, kafka_bootstrap):
    v1 = tmp_path / "greet.yaml"
    v1.write_text(V1, encoding="utf-8")
    code, out, err = await cli("deploy", str(v1), env=env)
    assert code == 0, err
    assert out == f"deployed: {v1}: greet@1 sha256 {source_sha256(V1)[:12]}\n"

    code, out, err = await cli("deploy", str(v1), env=env)
    assert code == 0, err
    assert out == f"unchanged: {v1}: greet@1 sha256 {source_sha256(V1)[:12]}\n"

    edited = tmp_path / "greet_edited.yaml"
    edited.write_text(V1_EDITED, encoding="utf-8")
    v2 = tmp_path / "greet_v2.yaml"
    v2.write_text(V2, encoding="utf-8")
    code, out, err = await cli("deploy", str(v2), str(edited), env=env)
    assert code == 1, (out, err)
    assert out == ""
    assert f"refused: {edited}: greet@1 is already deployed with other content" in err
    assert "bump `version`" in err and err.endswith("legato deploy: nothing deployed\n")

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsteps: []\n", encoding="utf-8")
    code, out, err = await cli("deploy", str(v2), str(bad), env=env)
    assert code == 1 and err.startswith(f"invalid: {bad}: steps: "), err

    on_topic = [codec.decode(DefinitionDeployed, r.value) for r in await records(kafka_bootstrap, topics.definitions)]
    assert [(d.name, d.version, d.sha256) for d in on_topic] == [("greet", 1, source_sha256(V1))]
    assert on_topic[0].source == V1 and on_topic[0].deployed_at.endswith("Z")

    code, out, err = await cli("deploy", str(v2), env=env)
    assert code == 0 and out.startswith(f"deployed: {v2}: greet@2 "), err
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    assert {topics.requests("say"), topics.requests("shout")} <= existing  # created by deploy, not by a first run

    code, out, err = await cli("definitions", env=env)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "SHA256", "DEPLOYED_AT"]
    rows = [line.split() for line in lines[1:]]
    assert [r[:3] for r in rows] == [["greet", "1", source_sha256(V1)[:12]], ["greet", "2", source_sha256(V2)[:12]]]
    assert all(r[3].endswith("Z") for r in rows)


async def test_table_sees_a_definition_deployed_while_it_runs_within_a_second(tmp_path, topics, kafka_bootstrap):
    name = f"live_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "live.yaml"
    path.write_text(V1.replace("greet", name), encoding="utf-8")
    candidates, _ = read_files([path])
    async with DefinitionTable(kafka_bootstrap, topics) as table:
        seen = []
        table.on_change(lambda catalog: seen.append(catalog.get(name, 1)))
        assert table.catalog.get(name, 1) is None
        plan = await deploy(candidates, kafka_bootstrap, topics)
        assert [o.action for o in plan.outcomes] == ["publish"]
        waited = await until(lambda: table.catalog.get(name, 1) is not None, timeout=1.0)
        assert seen and seen[-1] is not None
        assert table.catalog.latest(name).workflow.steps["hello"].activity == "say"
    print(f"definition usable {waited * 1000:.0f} ms after deploy returned")


async def test_a_bad_record_is_dead_lettered_and_the_table_goes_on(tmp_path, topics, kafka_bootstrap):
    name = f"after_bad_{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        async with DefinitionTable(kafka_bootstrap, topics) as table:
            rejected = len(table.rejected)
            await producer.send_and_wait(topics.definitions, b'{"name": "x", "version": 1}', key=b"x@1")
            forged = DefinitionDeployed(name="x", version=2, sha256="0" * 64, source=V1, deployed_at="2026-01-01T00:00:00Z")
            await producer.send_and_wait(topics.definitions, codec.dumps(forged), key=b"x@2")
            await until(lambda: len(table.rejected) >= rejected + 2, timeout=5.0)
            path = tmp_path / "after.yaml"
            path.write_text(V1.replace("greet", name), encoding="utf-8")
            await deploy(read_files([path])[0], kafka_bootstrap, topics)
            await until(lambda: table.catalog.get(name, 1) is not None, timeout=2.0)
    finally:
        await producer.stop()
    letters = [codec.decode(DeadLetter, r.value) for r in await records(kafka_bootstrap, topics.dlq)]
    reasons = {l.key: l.reason for l in letters if l.source_topic == topics.definitions}
    assert "invalid DefinitionDeployed" in reasons["x@1"]
    assert "is not the sha256 of the source" in reasons["x@2"]


async def test_concurrent_conflicting_deploys_one_wins(tmp_path, topics, kafka_bootstrap):
    """Two deployers of one name@version with other texts: fencing lets exactly one publish."""
    name = f"race_{uuid.uuid4().hex[:8]}"
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(V1.replace("greet", name), encoding="utf-8")
    b.write_text(V1_EDITED.replace("greet", name), encoding="utf-8")
    plans = await asyncio.gather(deploy(read_files([a])[0], kafka_bootstrap, topics), deploy(read_files([b])[0], kafka_bootstrap, topics))
    actions = sorted(p.outcomes[0].action for p in plans)
    assert actions == ["publish", "refused"], plans
    on_topic = [r for r in await records(kafka_bootstrap, topics.definitions) if r.key == f"{name}@1".encode()]
    assert len(on_topic) == 1


async def test_deploy_files_at_start_agrees_with_kafka_or_refuses(tmp_path, topics, kafka_bootstrap):
    name = f"files_{uuid.uuid4().hex[:8]}"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "w.yaml").write_text(V1.replace("greet", name), encoding="utf-8")
    (second / "w.yaml").write_text(V1_EDITED.replace("greet", name), encoding="utf-8")
    plan = await deploy_files([first], kafka_bootstrap, topics)
    assert [o.action for o in plan.outcomes] == ["publish"]
    plan = await deploy_files([first], kafka_bootstrap, topics)  # a restart with the same files
    assert [o.action for o in plan.outcomes] == ["unchanged"]
    with pytest.raises(DeployRefused, match=f"{name}@1 is already deployed with other content"):
        await deploy_files([second], kafka_bootstrap, topics)


KAFKA_ONLY = """\
name: kafka_only
steps:
  - id: done
    end: {output: "input.x"}
"""


async def test_a_coordinator_deploys_its_files_refuses_a_conflict_and_runs_what_is_deployed(tmp_path, env, topics, kafka_bootstrap):
    """At start the coordinator deploys its --workflows files under deploy's rules (a conflict stops it, naming the
    file) and decides every deployed definition, also those that are in no file of its own."""
    deployed = tmp_path / "kafka_only.yaml"
    deployed.write_text(KAFKA_ONLY, encoding="utf-8")
    code, out, err = await cli("deploy", str(deployed), env=env)
    assert code == 0, err

    conflicting = tmp_path / "conflicting"
    conflicting.mkdir()
    (conflicting / "greet.yaml").write_text(V1.replace("say", "whisper"), encoding="utf-8")
    code, out, err = await cli("coordinator", "--workflows", str(conflicting), env={**env, "LEGATO_DATA_DIR": str(tmp_path / "data")})
    assert code != 0
    assert f"refused: {conflicting / 'greet.yaml'}: greet@1 is already deployed with other content" in err, err

    own = tmp_path / "own"
    own.mkdir()
    (own / "greet.yaml").write_text(V1, encoding="utf-8")  # deployed before: unchanged
    log = (tmp_path / "coordinator.log").open("wb")
    proc = await asyncio.create_subprocess_exec(legato_executable(), "coordinator", "--workflows", str(own), cwd=REPO_ROOT,
                                                env={**env, "LEGATO_DATA_DIR": str(tmp_path / "data")}, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=log, stderr=log)
    try:
        run_id = f"ko-{uuid.uuid4().hex[:8]}"
        async with LegatoClient(kafka_bootstrap, topics.prefix) as client:
            event = await client.run("kafka_only", {"x": 7}, run_id=run_id, timeout=60.0)
        assert event.status == "succeeded" and event.output == 7, event
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)
        log.close()

    # redrive and fork --wait say why the coordinator would refuse, from the stored run and its pinned definition
    code, out, err = await cli("redrive", run_id, "--wait", env=env)
    assert code == 1 and err == f"legato redrive: run {run_id!r}: the run is succeeded: only a failed run can be redriven\n", err
    code, out, err = await cli("redrive", "no-such-run", "--wait", env=env)
    assert code == 1 and "unknown run (or forgotten after its retention)" in err, err
    code, out, err = await cli("fork", run_id, "--from", "zz", "--wait", env=env)
    assert code == 1 and err == "legato fork: 'zz' is no step of kafka_only@1: fork from one of its top-level steps (done)\n", err


async def test_a_deployer_killed_mid_transaction_leaves_nothing_and_does_not_block_the_next(tmp_path, topics, kafka_bootstrap):
    """A deployer that died with its transaction open: its record is never visible, and the next deployer fences it
    at once (no wait for the transaction timeout)."""
    name = f"killed_{uuid.uuid4().hex[:8]}"
    dead_text = V1_EDITED.replace("greet", name)
    dead = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=topics.deployer, enable_idempotence=True)
    await dead.start()
    try:
        await dead.begin_transaction()
        record = DefinitionDeployed(name=name, version=1, sha256=source_sha256(dead_text), source=dead_text, deployed_at="2026-01-01T00:00:00Z")
        await dead.send_and_wait(topics.definitions, codec.dumps(record), key=f"{name}@1".encode())
        # ... and the process is gone: no commit, no abort.
        path = tmp_path / "next.yaml"
        path.write_text(V1.replace("greet", name), encoding="utf-8")
        started = time.monotonic()
        plan = await deploy(read_files([path])[0], kafka_bootstrap, topics)
        assert [o.action for o in plan.outcomes] == ["publish"]
        assert time.monotonic() - started < 20.0  # the transaction timeout is 60 s
        async with DefinitionTable(kafka_bootstrap, topics, dead_letters=False) as table:
            assert table.catalog.get(name, 1).sha256 == source_sha256(V1.replace("greet", name))
            assert not [r for r in table.rejected if r.key == f"{name}@1"]
    finally:
        try:
            await dead.stop()
        except Exception:
            pass  # fenced


async def test_coordinators_started_together_all_deploy_the_same_files(tmp_path, topics, kafka_bootstrap):
    """Several coordinators started at the same moment (a scaled deployment) deploy the same files: the deployers fence
    one another, and each must still end with every file deployed once, none giving up."""
    tag = uuid.uuid4().hex[:8]
    folder = tmp_path / "flows"
    folder.mkdir()
    for n in range(5):
        (folder / f"w{n}.yaml").write_text(V1.replace("greet", f"together_{tag}_{n}"), encoding="utf-8")
    plans = await asyncio.gather(*(deploy_files([folder], kafka_bootstrap, topics) for _ in range(6)))
    assert all(not p.refused for p in plans)
    published = sorted(o.candidate.workflow.name for p in plans for o in p.outcomes if o.action == "publish")
    assert published == sorted(f"together_{tag}_{n}" for n in range(5)), published  # each once, by whichever won
    on_topic = [r.key for r in await records(kafka_bootstrap, topics.definitions) if r.key.decode().startswith(f"together_{tag}_")]
    assert sorted(on_topic) == sorted(f"together_{tag}_{n}@1".encode() for n in range(5))
