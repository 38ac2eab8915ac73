"""The consume loop: one consumer polls the co-partitioned input topics and hands each partition's records to that
partition's task, which decides and commits on its own (``partition``), so one partition's transaction never holds
up another's records."""
from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from legato.streams import kafka_io, security
from legato.streams.coordinator.fence import AnswerFence
from legato.streams.coordinator.cache import ResultTable
from legato.streams.coordinator.inbox import Inbox
from legato.streams.coordinator.marks import send_marks
from legato.streams.coordinator.payloads import PayloadValues
from legato.streams.coordinator.partition import GROUP_OFFSETS_EVERY_S, STATE_COMMIT_S, Partitions
from legato.streams.coordinator.rebalance import Rebalance
from legato.streams.coordinator.task import PartitionTask
from legato.streams.coordinator.timers import fire_timers
from legato.streams.coordinator.trace import Trace
from legato.streams.kafka_io import keyed_partitioner
from legato.streams.limiter import Limiter
from legato.streams.schedules import Schedules
from legato.topics.names import Topics
from legato.streams.admin import ensure_topics
from legato.streams.definitions import DefinitionTable
from legato.workflows.catalog import Catalog
from legato.workflows.machine import Machine

log = logging.getLogger("legato.coordinator")

_MAX_POLL = 500
"""Records per poll. A poll can land them all in one partition's queue past its ``_MAX_QUEUED`` pause, and that
partition's next batch decides them all at once: at 2,000, eight partitions' batches held 17,000 decoded states at
once in a burst, and the small-object heap kept that high-water mark (2.21 KiB per run in flight against 1.24 at
500; throughput unchanged; BENCHMARKS.md, memory)."""

_MAX_QUEUED = 500
"""Records queued for one partition before its fetching pauses (while its transaction commits). It also bounds a
transaction's size, and with it the memory that eight partitions' batches in flight hold at once (at 4,000 the
coordinator's RSS grew by 6.14 KiB per run in the 100,000-run memory benchmark; BENCHMARKS.md)."""


async def _trim_heap(interval: float = 5.0) -> None:
    """Give freed heap memory back to the OS every few seconds (glibc's ``malloc_trim``). Batches in flight are
    freed between run states that live on, and glibc keeps such holes: without this the coordinator's RSS grew
    by 3.75 KiB per run in flight instead of the states' own size (BENCHMARKS.md, memory)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim
    except (OSError, AttributeError):
        return  # not glibc
    while True:
        await asyncio.sleep(interval)
        libc.malloc_trim(0)


class Coordinator:
    """Runs the transactional coordinator loop for one process (several processes share the partitions)."""

    _limiting: asyncio.Task | None = None  # the limiter's task while serving

    def __init__(self, settings: Any, metrics: Any = None):
        self.settings = settings
        self.topics: Topics = settings.topics
        # every decision sees the table's catalog of that moment: a definition deployed while the coordinator runs
        # is used by the next trigger; a run keeps the version it started with (Machine.pinned)
        self.definitions = DefinitionTable(settings.bootstrap, self.topics, kafka=security.aiokafka_kwargs())
        make_payloads = getattr(settings, "payloads", None)  # claim checks: expressions read values, runs keep references
        payloads = make_payloads(metrics) if callable(make_payloads) else None
        self.payload_values = PayloadValues(payloads) if payloads is not None else None
        self.machine = Machine(lambda: self.definitions.catalog, default_retention_s=settings.retention_s,
                               payloads=self.payload_values.lookup if self.payload_values is not None else None)
        self.partition_count: int = settings.partitions
        self.metrics = metrics
        self._known: set[str] = set()
        self._keyed: set[str] = set()  # workflows with a concurrency key (a version of them)
        self._background: set[asyncio.Task] = set()  # name@version of the definitions whose topics and metrics are set up
        self.group = self.topics.coordinator_group
        self.inputs = [self.topics.triggers, self.topics.coordinator, self.topics.completions, self.topics.signals]
        self.tasks: dict[int, PartitionTask] = {}  # the active tasks by partition (parked ones are not here)
        # every coordinator follows the whole result cache topic: a hit is answered here, for every worker
        self.cache = ResultTable(settings.bootstrap, self.topics, kafka=security.aiokafka_kwargs(), metrics=metrics)
        self.partitions = Partitions(self.machine, self.topics, self.group, Inbox(self.topics, self.partition_count), metrics,
                                     trace=Trace(settings.trace_file) if getattr(settings, "trace_file", None) else None, cache=self.cache,
                                     state_commit_s=getattr(settings, "state_commit_ms", STATE_COMMIT_S * 1000) / 1000, payloads=self.payload_values)
        self.partitions.keyed = lambda: self._keyed
        self.rebalance = Rebalance(self)
        # the cluster-wide limits are decided in every coordinator process too: users deploy nothing else
        self.limiter = Limiter(settings.bootstrap, self.topics, settings.session_timeout, metrics=metrics)
        self._consumer: AIOKafkaConsumer | None = None
        self._session_timeout_ms = int(settings.session_timeout * 1000)

    @property
    def consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "the coordinator is not serving"
        return self._consumer

    async def serve(self) -> None:
        """Consume, decide and commit until cancelled; then leave the group so the partitions move at once."""
        kw = security.aiokafka_kwargs()
        await self.definitions.start()
        await self.cache.start()
        self.definitions.on_change(self._on_catalog)
        self._on_catalog(self.definitions.catalog)
        timer_producer = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap, enable_idempotence=True, acks="all", linger_ms=0, partitioner=keyed_partitioner, **kw)
        await timer_producer.start()
        if getattr(self.settings, "early_requests", False):
            self.partitions.early = timer_producer  # idempotent, not transactional: requests ahead of their transaction
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            partition_assignment_strategy=(RangePartitionAssignor,),  # co-partitions the input topics
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=max(100, self._session_timeout_ms // 4),
            fetch_max_wait_ms=100,
            **kw,
        )
        self._consumer.subscribe(self.inputs, listener=self.rebalance)
        await self._consumer.start()
        consumer = self._consumer
        self.partitions.position = lambda tp: kafka_io.fetched_position(consumer, tp)
        fence = AnswerFence(self.settings.bootstrap, self.topics.completions, self.partition_count, lambda: consumer, self.tasks, **kw)
        await fence.start()
        timers = asyncio.create_task(fire_timers(self.tasks, timer_producer, self.topics.coordinator, fence.look), name="legato.fire_timers")
        if self.metrics is not None:
            self.metrics.count_runs(self._run_counts)  # read at each scrape (legato_runs_in_flight, legato_runs_retained)
        trim = asyncio.create_task(_trim_heap(), name="legato.trim_heap")
        # the schedules whose name hashes to a partition this process owns are fired here (streams/schedules.py)
        schedules = Schedules(self.settings.bootstrap, self.topics, self.partition_count, self.tasks.__contains__, self.metrics)
        firing = asyncio.create_task(schedules.run(), name="legato.schedules")
        self._limiting = asyncio.create_task(self.limiter.serve(), name="legato.limiter")
        marking = asyncio.create_task(send_marks(self, timer_producer), name="legato.trigger_marks")
        try:
            await self._consume()
        finally:
            self._limiting.cancel()
            marking.cancel()
            firing.cancel()
            timers.cancel()
            trim.cancel()
            loops = [t.loop for t in self.tasks.values() if t.loop is not None]
            for loop in loops:
                loop.cancel()  # a batch being committed is aborted: whoever owns the partition next reads it again
            await asyncio.gather(firing, self._limiting, *loops, return_exceptions=True)
            await self._consumer.stop()  # revokes and leaves the group
            await self.rebalance.stop()
            await fence.stop()
            await timer_producer.stop()
            await self.cache.stop()
            await self.definitions.stop()
            if self.payload_values is not None:
                await self.payload_values.payloads.stop()

    def keyed_workflows(self) -> bool:
        """A deployed workflow has a concurrency key (then the trigger marks are sent: coordinator.marks)."""
        return bool(self._keyed)

    def _on_catalog(self, catalog: Catalog) -> None:
        """New definitions: their choice paths exist at 0 in the metrics (dead paths show), and their topics are
        created (``legato deploy`` creates them; a raw producer or another cluster's deployer may not have)."""
        self._keyed = {d.name for d in catalog if d.workflow.definition.concurrency is not None}
        new = [d.workflow for d in catalog if d.key not in self._known]
        if not new:
            return
        self._known.update(d.key for d in catalog)
        if self.metrics is not None:
            self.metrics.declare(new)
        activities = sorted({a for wf in new for a in wf.activities})
        completions = sorted({wf.definition.completion_topic for wf in new if wf.definition.completion_topic})
        task = asyncio.create_task(ensure_topics(self.settings.bootstrap, self.topics, activities, self.partition_count, completions,
                                                 replication=self.settings.replication))
        self._background.add(task)
        task.add_done_callback(self._topics_created)

    def _topics_created(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("creating the topics of new definitions failed: %s", task.exception())

    async def _consume(self) -> None:
        """Poll, and hand each partition's records to its task."""
        consumer = self.consumer
        failures = 0
        while True:
            if self._limiting is not None and self._limiting.done():
                self._limiting.result()  # the limiter failed: so does the process (its supervisor restarts it)
                raise RuntimeError("the limiter stopped")
            if self.rebalance.pending:
                if await self.rebalance.open_pending():
                    failures = 0
                else:  # the broker is away: the other partitions keep going, this one is tried again
                    failures += 1
                    await asyncio.sleep(min(5.0, 0.1 * 2**failures))
            polled = await consumer.getmany(timeout_ms=200, max_records=_MAX_POLL)
            received = time.perf_counter()
            for tp, records in polled.items():
                task = self.tasks.get(tp.partition)
                if task is None:
                    continue  # fetched before a revocation (the new owner reads them) or while it reloads
                if tp.topic == self.topics.triggers:
                    for msg in records:
                        task.marks.polled_trigger(msg.offset, msg.timestamp)
                elif tp.topic == self.topics.coordinator:
                    for msg in records:
                        task.marks.polled_coordinator(msg.offset, msg.value, msg.timestamp)
                task.inbox.append((tp, records, received))
                task.queued += len(records)
                task.wake.set()
                if task.queued >= _MAX_QUEUED and not task.paused:
                    task.paused = True
                    consumer.pause(*self.assigned(task.partition))

    async def _run_task(self, task: PartitionTask) -> None:
        """Decide and commit the task's queued records, one transaction per turn, until the task is closed."""
        while self.tasks.get(task.partition) is task:
            if task.group_offsets_behind:
                try:
                    await asyncio.wait_for(task.wake.wait(), GROUP_OFFSETS_EVERY_S)
                except asyncio.TimeoutError:  # idle: bring the group's offsets (what lag monitoring reads) up to date
                    async with task.busy:
                        if self.tasks.get(task.partition) is task and not task.wake.is_set() and task.group_offsets_behind:
                            try:
                                await self.partitions.flush_group_offsets(task)
                            except Exception as exc:
                                await self.rebalance.reload(task, type(exc).__name__)
                    continue
            else:
                await task.wake.wait()
            async with task.busy:
                task.wake.clear()
                if self.tasks.get(task.partition) is not task:
                    return
                parts = self._take(task)
                if parts:
                    why = await self.partitions.process(task, parts, lambda: self._take(task))
                    if why is not None:
                        await self.rebalance.reload(task, why)

    def _take(self, task: PartitionTask) -> list[tuple[TopicPartition, list[Any], float]]:
        """The records queued for ``task``, its fetching resumed if a full queue had paused it."""
        parts, task.inbox, task.queued = task.inbox, [], 0
        if task.paused and self.tasks.get(task.partition) is task:
            task.paused = False
            self.consumer.resume(*self.assigned(task.partition))
        return parts

    def assigned(self, p: int) -> list[TopicPartition]:
        """This process's assigned input topic-partitions numbered ``p``."""
        return [tp for tp in self.consumer.assignment() if tp.partition == p]

    def start(self, task: PartitionTask) -> None:
        """Make ``task`` the active task of its partition and start its loop."""
        self.tasks[task.partition] = task
        task.loop = asyncio.create_task(self._run_task(task), name=f"legato.partition-{task.partition}")

    def _run_counts(self) -> tuple[int, int]:
        """Runs running and runs retained in this process's committed tables (the scrape's thread reads it: a copy of
        the task list, retried if the loop changes it meanwhile)."""
        for _ in range(5):
            try:
                tasks = list(self.tasks.values())
                break
            except RuntimeError:  # the dict changed size during the copy
                continue
        else:
            raise RuntimeError("the partition table kept changing")
        running = sum(t.running for t in tasks)
        return running, sum(t.stored for t in tasks) - running
