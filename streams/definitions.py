"""Workflow definitions as records on Kafka: ``legato deploy`` publishes them, a DefinitionTable reads them.

The compacted topic ``<prefix>.definitions`` holds one DefinitionDeployed per ``<name>@<version>``. A name@version
is immutable: deploying the same text again changes nothing, other text under it is refused (bump the version).

Deployers serialise through one transactional id (``Topics.deployer``): starting the producer fences any other
deployer, and only then is the topic read and the new records written in one transaction. So two deploys of one
name@version with different text can never both land, and a deployer killed at any moment leaves either all of its
records or none (an aborted transaction is invisible to the read_committed tables).

A DefinitionTable is a view of the topic, rebuilt from its start by every process (no consumer group): killing the
process at any moment loses nothing. It keeps reading, so a definition deployed while it runs is usable well within
a second.
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from legato.streams import kafka_io
from legato.topics import codec
from legato.topics.codec import DecodeError
from legato.topics.models import DefinitionDeployed
from legato.topics.names import Topics
from legato.workflows.catalog import Catalog, Definition, definition_key, source_sha256
from legato.workflows.model import CompiledWorkflow, DefinitionError, load_source, read_source

log = logging.getLogger("legato.definitions")

_DEPLOY_ATTEMPTS = 8
"""A deployer fenced by another one reads the topic again and retries this often."""

_REJECTED_KEPT = 1000
"""The latest unusable records a table lists (all of them are dead-lettered)."""

_FOLLOW_POLL_MS = 200
"""How long one poll of a following table waits for records (a deployed definition is seen within about this)."""


# --- files -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A definition file, validated exactly like ``legato validate`` does."""

    file: str
    source: str
    sha256: str
    workflow: CompiledWorkflow

    @property
    def key(self) -> str:
        return definition_key(self.workflow.name, self.workflow.version)


def read_files(files: Iterable[str | Path]) -> tuple[list[Candidate], list[DefinitionError]]:
    """Each file read once and compiled from that text; the problems, one per refused file."""
    candidates, errors = [], []
    for file in files:
        try:
            source = read_source(file)
            candidates.append(Candidate(str(file), source, source_sha256(source), load_source(source, str(file))))
        except DefinitionError as exc:
            errors.append(exc)
    return candidates, errors


def topics_needed(candidates: Iterable[Candidate]) -> tuple[list[str], list[str]]:
    """The activities (their request topics) and completion topics the definitions use, to create before a run
    of them needs them (like ``ensure_topics`` does for ``--workflows`` at start)."""
    candidates = list(candidates)
    activities = sorted({a for c in candidates for a in c.workflow.activities})
    completion = sorted({c.workflow.definition.completion_topic for c in candidates if c.workflow.definition.completion_topic})
    return activities, completion


def definition_files(dirs: Iterable[str | Path]) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` in ``dirs`` (not recursive), in order; DefinitionError for a missing directory."""
    files: list[Path] = []
    for directory in dirs:
        d = Path(directory)
        if not d.is_dir():
            raise DefinitionError(str(d), "", "not a directory")
        files += sorted([*d.glob("*.yaml"), *d.glob("*.yml")])
    return files


# --- the rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    candidate: Candidate
    action: str  # publish | unchanged | refused
    reason: str = ""


@dataclass
class DeployPlan:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.action == "refused"]

    @property
    def to_publish(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.action == "publish"]


def plan_deploy(candidates: list[Candidate], deployed: Catalog) -> DeployPlan:
    """What deploying ``candidates`` onto ``deployed`` does, file by file: publish it, nothing (the same text is
    deployed), or refuse it (its name@version is deployed, or given twice, with other text)."""
    plan = DeployPlan()
    taken: dict[str, Candidate] = {}
    for c in candidates:
        existing = deployed.get(c.workflow.name, c.workflow.version)
        earlier = taken.get(c.key)
        if existing is not None and existing.sha256 != c.sha256:
            plan.outcomes.append(Outcome(c, "refused", (
                f"{c.key} is already deployed with other content (sha256 {existing.sha256[:12]}, deployed at "
                f"{existing.deployed_at or '?'}; this file's is {c.sha256[:12]}): bump `version` to deploy a change")))
        elif earlier is not None and earlier.sha256 != c.sha256:
            plan.outcomes.append(Outcome(c, "refused", f"{c.key} is also defined, with other content, in {earlier.file}: bump `version` in one of them"))
        elif existing is not None or earlier is not None:
            plan.outcomes.append(Outcome(c, "unchanged", f"{c.key} is deployed with the same content" if existing else f"same as {earlier.file}"))
        else:
            taken[c.key] = c
            plan.outcomes.append(Outcome(c, "publish"))
    return plan


class DeployRefused(Exception):
    """Files and Kafka disagree: a name@version is deployed (or given twice) with other content, or a file is
    invalid. The message lists every problem."""


# --- the table ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejected:
    """A record on the definitions topic that the table does not use, and why."""

    partition: int
    offset: int
    key: str | None
    reason: str


class DefinitionTable:
    """Every definition on the topic, compiled: ``catalog`` (lookups by name and version, latest by name), replaced
    by a new Catalog on every change; ``version`` counts the changes; ``on_change`` callbacks get the new catalog.

    A record that cannot be used (not a DefinitionDeployed, a key other than its name@version, a sha256 that does
    not match its source, a source that does not compile, other text under a name@version the table already holds)
    is dead-lettered with the reason when ``dead_letters`` is set, and listed in ``rejected``; the table goes on.
    The first record of a name@version wins; deployers refuse the rest, so only a raw producer writes them.
    A tombstone removes its name@version.
    """

    def __init__(self, bootstrap: str, topics: Topics, *, kafka: dict[str, Any] | None = None, dead_letters: bool = True):
        self.bootstrap = bootstrap
        self.topics = topics
        self.catalog = Catalog()
        self.version = 0
        self.rejected: deque[Rejected] = deque(maxlen=_REJECTED_KEPT)
        self._kafka = dict(kafka or {})
        self._dead_letters = dead_letters
        self._listeners: list[Callable[[Catalog], None]] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._partitions: list[TopicPartition] = []
        self._follow: asyncio.Task | None = None

    def on_change(self, listener: Callable[[Catalog], None]) -> None:
        self._listeners.append(listener)

    async def __aenter__(self) -> "DefinitionTable":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, follow: bool = True, timeout: float = 30.0) -> None:
        """Read the topic from its start up to its end, then (``follow``) keep reading it in the background."""
        self._consumer = kafka_io.reader(self.bootstrap, **self._kafka)
        try:
            await self._consumer.start()
            if self._dead_letters:
                self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True, linger_ms=0, **self._kafka)
                await self._producer.start()
            self._partitions = await kafka_io.assign_all(self._consumer, [self.topics.definitions], from_beginning=True, wait=timeout, missing=_missing)
            await self.catch_up(timeout)
        except BaseException:
            await self.stop()
            raise
        if follow:
            self._follow = asyncio.create_task(self._follow_loop(), name="legato-definitions")

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            try:
                await self._follow
            except asyncio.CancelledError:
                pass
            self._follow = None
        consumer, producer, self._consumer, self._producer = self._consumer, self._producer, None, None
        if consumer is not None:
            await consumer.stop()
        if producer is not None:
            await producer.stop()

    async def catch_up(self, timeout: float = 30.0) -> None:
        """Read until the end offsets of now (the last stable offsets: read_committed)."""
        assert self._consumer is not None and self._follow is None, "catch_up is for a table that does not follow"
        consumer = self._consumer
        ends = await consumer.end_offsets(self._partitions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any([await consumer.position(tp) < ends[tp] for tp in self._partitions]):
            if loop.time() > deadline:
                raise TimeoutError(f"reading {self.topics.definitions} took longer than {timeout:g}s")
            await self._apply_batch(await consumer.getmany(timeout_ms=_FOLLOW_POLL_MS))

    async def _follow_loop(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=_FOLLOW_POLL_MS)
            except Exception as exc:  # the broker is away: the consumer reconnects; keep our position
                log.warning("reading %s: %s", self.topics.definitions, exc)
                await asyncio.sleep(1.0)
                continue
            await self._apply_batch(batch)

    async def _apply_batch(self, batch: dict[TopicPartition, list[Any]]) -> None:
        before = self.version
        for tp in sorted(batch, key=lambda t: t.partition):
            for record in batch[tp]:
                reason = self.apply(tp.partition, record.offset, record.key, record.value)
                if reason is not None:
                    await self._dead_letter(tp.partition, record.offset, record.key, record.value, reason)
        if self.version != before:
            for listener in self._listeners:
                try:
                    listener(self.catalog)
                except Exception:  # a listener's bug must not stop the table
                    log.exception("definition listener failed")

    def apply(self, partition: int, offset: int, key: bytes | None, value: bytes | None) -> str | None:
        """Apply one record to the table; the reason when it is rejected (never raises)."""
        key_text = key.decode("utf-8", "replace") if key is not None else None
        try:
            reason = self._apply(key_text, value)
        except Exception as exc:  # a compiler bug on a strange definition must not stop the table
            log.exception("definition record %s:%s@%s", self.topics.definitions, partition, offset)
            reason = f"cannot compile: {type(exc).__name__}: {exc}"
        if reason is not None:
            self.rejected.append(Rejected(partition, offset, key_text, reason))
        return reason

    def _apply(self, key: str | None, value: bytes | None) -> str | None:
        if value is None:
            name, _, version = (key or "").rpartition("@")
            if name and version.isdigit() and self.catalog.get(name, int(version)) is not None:
                self._change(self.catalog.without(name, int(version)))
            return None
        try:
            record = codec.decode(DefinitionDeployed, value)
        except DecodeError as exc:
            return str(exc)
        expected = definition_key(record.name, record.version)
        if key != expected:
            return f"key {key!r} is not the record's name@version {expected!r}"
        if source_sha256(record.source) != record.sha256:
            return f"sha256 {record.sha256} is not the sha256 of the source ({source_sha256(record.source)})"
        existing = self.catalog.get(record.name, record.version)
        if existing is not None:
            if existing.sha256 == record.sha256:
                return None  # the same definition again
            return f"{expected} is already deployed with other content (sha256 {existing.sha256[:12]}): a change needs a new version"
        try:
            workflow = load_source(record.source, expected)
        except DefinitionError as exc:
            return f"invalid definition: {exc}"
        if (workflow.name, workflow.version) != (record.name, record.version):
            return f"the source defines {definition_key(workflow.name, workflow.version)}, not {expected}"
        self._change(self.catalog.with_definition(Definition(workflow, record.sha256, record.deployed_at)))
        return None

    def _change(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.version += 1

    async def _dead_letter(self, partition: int, offset: int, key: bytes | None, value: bytes | None, reason: str) -> None:
        if self._producer is None:
            return  # a reader that does not dead-letter (legato definitions, a deployer) has them in `rejected`
        from legato.streams.dlq import dead_letter

        letter_key, data = dead_letter(self.topics.definitions, partition, offset, key, value, reason)
        try:
            await self._producer.send_and_wait(self.topics.dlq, data, key=letter_key)
        except KafkaError:
            log.exception("cannot write the dead letter of %s:%s@%s", self.topics.definitions, partition, offset)


async def read_catalog(bootstrap: str, topics: Topics, *, kafka: dict[str, Any] | None = None, timeout: float = 30.0) -> DefinitionTable:
    """The table as of now, read once (no dead letters, no following)."""
    table = DefinitionTable(bootstrap, topics, kafka=kafka, dead_letters=False)
    await table.start(follow=False, timeout=timeout)
    await table.stop()
    return table


# --- publishing --------------------------------------------------------------------------------------


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def deploy(candidates: list[Candidate], bootstrap: str, topics: Topics, *, kafka: dict[str, Any] | None = None,
                 timeout: float = 30.0, clock: Callable[[], str] = _now_rfc3339) -> DeployPlan:
    """Publish every candidate not yet deployed, all in one transaction, or nothing when any is refused.

    The plan is made twice: once on a plain read (a deploy that changes nothing needs no producer), and again after
    the deployer's transactional producer started (fencing any other deployer) and the table read on to the end.
    """
    table = DefinitionTable(bootstrap, topics, kafka=kafka, dead_letters=False)
    await table.start(follow=False, timeout=timeout)
    try:
        plan = plan_deploy(candidates, table.catalog)
        if plan.refused or not plan.to_publish:
            return plan
        for attempt in range(1, _DEPLOY_ATTEMPTS + 1):
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=topics.deployer, enable_idempotence=True,
                                        linger_ms=0, **(kafka or {}))
            await producer.start()  # InitProducerId: fences every other deployer, aborting its open transaction
            try:
                await table.catch_up(timeout)
                plan = plan_deploy(candidates, table.catalog)
                if plan.refused or not plan.to_publish:
                    return plan
                deployed_at = clock()
                async with producer.transaction():
                    for outcome in plan.to_publish:
                        c = outcome.candidate
                        record = DefinitionDeployed(name=c.workflow.name, version=c.workflow.version, sha256=c.sha256,
                                                    source=c.source, deployed_at=deployed_at)
                        await producer.send_and_wait(topics.definitions, codec.dumps(record), key=c.key.encode())
                return plan
            except KafkaError as exc:  # fenced by another deployer, or the broker went away: read again and retry
                if attempt == _DEPLOY_ATTEMPTS:
                    raise
                log.warning("deploy attempt %d failed (%s); reading %s again", attempt, exc, topics.definitions)
                await asyncio.sleep(random.uniform(0.1, 0.4) * attempt)  # apart, so deployers started together stop fencing each other
            finally:
                await producer.stop()
        raise AssertionError("unreachable")
    finally:
        await table.stop()


async def deploy_files(dirs: Iterable[str | Path], bootstrap: str, topics: Topics, *, kafka: dict[str, Any] | None = None,
                       timeout: float = 30.0) -> DeployPlan:
    """Deploy every definition file in ``dirs`` (``--workflows`` / ``LEGATO_WORKFLOWS``) under ``legato deploy``'s
    rules, so files and Kafka never disagree silently: raise DeployRefused, publishing nothing, when a file is invalid
    or its name@version is deployed (or in another file) with other content. The coordinator calls it at start."""
    try:
        files = definition_files(dirs)
    except DefinitionError as exc:
        raise DeployRefused(str(exc)) from None
    candidates, errors = read_files(files)
    if errors:
        raise DeployRefused("; ".join(f"invalid: {e}" for e in errors))
    plan = await deploy(candidates, bootstrap, topics, kafka=kafka, timeout=timeout)
    if plan.refused:
        raise DeployRefused("; ".join(f"refused: {o.candidate.file}: {o.reason}" for o in plan.refused))
    return plan


def _missing(topic: str) -> None:
    raise RuntimeError(f"topic {topic} does not exist (it is created by the coordinator at start)")
