"""Which requests a partition's batch sends ahead of its transaction (Partitions.early) and which stay in it, and
what makes a request a duplicate for a worker when one is decided twice (streams/worker._delivery)."""
from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace

from aiokafka import TopicPartition

from legato.streams.coordinator.inbox import Inbox
from legato.streams.coordinator.partition import Partitions
from legato.streams.coordinator.table import RunTable
from legato.streams.coordinator.task import PartitionTask
from legato.streams.worker import _delivery
from legato.topics import codec
from legato.topics.models import ActivityCompleted, ActivityRequested, RunAccepted, TimerFired
from legato.topics.names import CHANGELOG_OFFSETS_KEY, Topics
from legato.workflows.machine import Machine
from tests.machine_helpers import compile_yaml

TOPICS = Topics()

WORKFLOW = """
name: chain
steps:
  - id: a
    activity: noop
  - id: b
    activity: noop
  - id: c
    activity: noop
"""

_OFFSETS = itertools.count()


def _msgs(records):
    return [SimpleNamespace(topic=topic, partition=0, offset=next(_OFFSETS), key=None, value=value) for topic, value in records]


def _decide(partitions, task, msgs):
    by_tp: dict = {}
    for m in msgs:
        by_tp.setdefault(TopicPartition(m.topic, 0), []).append(m)
    batch = partitions._decide_batch(task, [(tp, ms, 0.0) for tp, ms in by_tp.items()])
    for tp, offset in batch.offsets.items():
        task.next_offset[tp] = offset
    return batch


def _requests(sends):
    return [codec.decode(ActivityRequested, v) for t, _, v, _ in sends if t == TOPICS.requests("noop")]


def _accepted(run_id):
    return (TOPICS.coordinator, codec.dumps(RunAccepted(run_id=run_id, workflow="chain", input={})))


def _completion(req, status="succeeded"):
    done = ActivityCompleted(request_id=req.request_id, run_id=req.run_id, step_id=req.step_id, attempt=req.attempt, status=status, output={})
    return (TOPICS.completions, codec.dumps(done))


def _partitions(early=True):
    # any non-None producer turns early sending on; _decide_batch only sorts the records, it sends nothing
    return Partitions(Machine({"chain": compile_yaml(WORKFLOW)}), TOPICS, "g", Inbox(TOPICS, 1), early=object() if early else None)


def test_a_request_caused_by_a_completion_goes_ahead_of_the_transaction_and_one_caused_by_a_trigger_does_not():
    partitions, task = _partitions(), PartitionTask(0, None, RunTable(None))
    started = _decide(partitions, task, _msgs([_accepted("r1")]))
    assert started.early == []
    [a] = _requests(started.sends)
    assert a.step_id == "a"

    moved = _decide(partitions, task, _msgs([_completion(a)]))
    [b] = _requests(moved.early)
    assert b.step_id == "b" and _requests(moved.sends) == []
    assert b"r1" in moved.written, "the run's new state is still written in the transaction"


def test_a_run_that_another_input_changed_in_the_same_batch_keeps_its_requests_in_the_transaction():
    partitions, task = _partitions(), PartitionTask(0, None, RunTable(None))
    [a] = _requests(_decide(partitions, task, _msgs([_accepted("r2")])).sends)
    timeout = TimerFired(run_id="r2", timer_id="run:timeout", due_ms=0)  # stale here: only its topic matters
    batch = _decide(partitions, task, _msgs([(TOPICS.coordinator, codec.dumps(timeout)), _completion(a)]))
    assert batch.early == []
    assert [r.step_id for r in _requests(batch.sends)] == ["b"]


def test_in_one_batch_only_the_runs_changed_by_completions_alone_send_early():
    partitions, task = _partitions(), PartitionTask(0, None, RunTable(None))
    [a1] = _requests(_decide(partitions, task, _msgs([_accepted("r3")])).sends)
    batch = _decide(partitions, task, _msgs([_accepted("r4"), _completion(a1)]))
    assert [(r.run_id, r.step_id) for r in _requests(batch.early)] == [("r3", "b")]
    assert [(r.run_id, r.step_id) for r in _requests(batch.sends)] == [("r4", "a")]


def test_without_an_early_producer_every_request_is_in_the_transaction():
    partitions, task = _partitions(early=False), PartitionTask(0, None, RunTable(None))
    [a] = _requests(_decide(partitions, task, _msgs([_accepted("r5")])).sends)
    batch = _decide(partitions, task, _msgs([_completion(a)]))
    assert batch.early == [] and [r.step_id for r in _requests(batch.sends)] == ["b"]


def test_a_request_decided_again_after_a_lost_transaction_is_a_duplicate_for_workers_and_a_reused_run_id_is_not():
    machine = Machine({"chain": compile_yaml(WORKFLOW)})
    state, commands = machine.decide(None, RunAccepted(run_id="r6", workflow="chain", input={}), 1_000)
    [a] = [c.request for c in commands if hasattr(c, "request")]
    after = state.model_dump_json()
    # the same completion decided twice on the same stored state, at two moments (the crash's replay is later)
    first = machine.decide(type(state).model_validate_json(after), ActivityCompleted.model_validate_json(_completion(a)[1]), 2_000)[1]
    again = machine.decide(type(state).model_validate_json(after), ActivityCompleted.model_validate_json(_completion(a)[1]), 9_000)[1]
    [b1] = [c.request for c in first if hasattr(c, "request")]
    [b2] = [c.request for c in again if hasattr(c, "request")]
    assert b1.request_id == b2.request_id and b1.requested_ms != b2.requested_ms
    assert b1.run_started_ms == b2.run_started_ms == 1_000
    assert _delivery(b1) == _delivery(b2)
    # the run_id started again after its retention asks the same request ids: not a duplicate
    _, reused = machine.decide(None, RunAccepted(run_id="r6", workflow="chain", input={}), 50_000)
    [a_again] = [c.request for c in reused if hasattr(c, "request")]
    assert a_again.request_id == a.request_id and _delivery(a_again) != _delivery(a)
    # a coordinator from before run_started_ms: requested_ms still tells the two apart
    old = a.model_copy(update={"run_started_ms": None})
    assert _delivery(old) == f"{a.request_id}@{a.requested_ms}"


class _Producer:
    """Stands in for the partition's transactional producer and the early producer: records what each transaction
    held (the partition task's scheduling is under test here, not Kafka's)."""

    def __init__(self):
        self.transactions: list[list[tuple[str, bytes | None, bytes | None]]] = []
        self.early: list[tuple[str, bytes | None, bytes | None]] = []
        self._open: list[tuple[str, bytes | None, bytes | None]] | None = None

    async def begin_transaction(self):
        self._open = []

    async def send(self, topic, value, key=None, partition=None):
        (self._open if self._open is not None else self.early).append((topic, key, value))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def send_offsets_to_transaction(self, offsets, group):
        pass

    async def commit_transaction(self):
        self.transactions.append(self._open)
        self._open = None

    async def abort_transaction(self):
        self._open = None


def _parts(msgs):
    by_tp: dict = {}
    for m in msgs:
        by_tp.setdefault(TopicPartition(m.topic, 0), []).append(m)
    return [(tp, ms, 0.0) for tp, ms in by_tp.items()]


def _changelog_keys(transaction):
    return sorted(key for topic, key, _ in transaction if topic == TOPICS.changelog and key != CHANGELOG_OFFSETS_KEY)


async def test_a_batch_of_nothing_but_run_states_waits_for_more_and_one_with_a_terminal_or_first_request_commits_at_once():
    producer, early = _Producer(), _Producer()
    machine = Machine({"chain": compile_yaml(WORKFLOW)})
    partitions = Partitions(machine, TOPICS, "g", Inbox(TOPICS, 1), early=early, state_commit_s=0.2)
    task = PartitionTask(0, producer, RunTable(None))
    take = lambda: _take(task)  # noqa: E731

    # two runs start: their first requests are in the transaction, which commits at once
    assert await partitions.process(task, _parts(_msgs([_accepted("w1"), _accepted("w2")])), take) is None
    assert len(producer.transactions) == 1
    first = {r.run_id: r for r in _requests([(t, k, v, None) for t, k, v in producer.transactions[0]])}
    assert sorted(first) == ["w1", "w2"]

    # w1's completion is decided; w2's arrives while that batch has nothing but states in it: one transaction
    w1_done, w2_done = _msgs([_completion(first["w1"]), _completion(first["w2"])])  # in this order on one partition
    task.inbox.append(_parts([w2_done])[0])
    assert await partitions.process(task, _parts([w1_done]), take) is None
    assert len(producer.transactions) == 2, "the second completion joined the waiting batch"
    assert _changelog_keys(producer.transactions[1]) == [b"w1", b"w2"]
    assert sorted((r.run_id, r.step_id) for r in _requests([(t, k, v, None) for t, k, v in early.early])) == [("w1", "b"), ("w2", "b")], \
        "both next requests went ahead, before the transaction"
    assert _requests([(t, k, v, None) for t, k, v in producer.transactions[1]]) == []

    # a batch that carries a run's first request does not wait, however long the wait for states is
    partitions.state_commit_s = 30.0
    await asyncio.wait_for(partitions.process(task, _parts(_msgs([_accepted("w3")])), take), 5.0)
    assert len(producer.transactions) == 3 and _changelog_keys(producer.transactions[2]) == [b"w3"]


def _take(task):
    parts, task.inbox, task.queued = task.inbox, [], 0
    return parts


class _Overheads:
    """Records the step overheads the partition task observes; every other metric is a no-op."""

    def __init__(self):
        self.observed: list[tuple[str, float]] = []

    def observes_overhead(self, commands):
        from legato.streams.metrics import Metrics

        return Metrics.observes_overhead(commands)

    def orchestration_overhead(self, workflow, seconds):
        self.observed.append((workflow, seconds))

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


async def test_each_early_request_s_overhead_counts_from_when_its_own_completion_was_polled():
    import time

    producer, early, metrics = _Producer(), _Producer(), _Overheads()
    partitions = Partitions(Machine({"chain": compile_yaml(WORKFLOW)}), TOPICS, "g", Inbox(TOPICS, 1), metrics=metrics, early=early, state_commit_s=0.2)
    task = PartitionTask(0, producer, RunTable(None))
    assert await partitions.process(task, _parts(_msgs([_accepted("o1"), _accepted("o2")])), lambda: _take(task)) is None
    first = {r.run_id: r for r in _requests([(t, k, v, None) for t, k, v in producer.transactions[0]])}
    old, new = _msgs([_completion(first["o1"]), _completion(first["o2"])])
    now = time.perf_counter()
    # o1's completion was polled 5 s ago; o2's now, joining the batch that waits for more
    task.inbox.append((TopicPartition(TOPICS.completions, 0), [new], now))
    assert await partitions.process(task, [(TopicPartition(TOPICS.completions, 0), [old], now - 5.0)], lambda: _take(task)) is None
    assert len(producer.transactions) == 2
    [(_, o1), (_, o2)] = metrics.observed
    assert o1 >= 5.0 and o2 < 1.0, metrics.observed
