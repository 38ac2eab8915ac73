"""The coordinator's result cache (streams/coordinator/cache.py): the table rebuilt from the topic's records, the
hit-or-miss decision for a request, and what a batch writes for each (effects.carry_out, Partitions)."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import orjson
import pytest
from aiokafka import TopicPartition

from legato.streams.coordinator.cache import ResultTable
from legato.streams.coordinator.effects import carry_out
from legato.streams.coordinator.inbox import Inbox
from legato.streams.coordinator.partition import Partitions
from legato.streams.coordinator.table import RunTable
from legato.streams.coordinator.task import PartitionTask
from legato.streams.metrics import Metrics
from legato.topics import codec
from legato.topics.cache import fingerprint
from legato.topics.models import ActivityCompleted, ActivityRequested, CachedResult, RunAccepted
from legato.topics.names import Topics
from legato.workflows.machine import CacheResult, Machine, RequestActivity
from tests.machine_helpers import compile_yaml

TOPICS = Topics()
NOW = 1_700_000_000_000
HOUR = 3_600_000


def entry(output, stored_ms, confidence=None) -> bytes:
    return orjson.dumps({"output": output, "confidence": confidence, "stored_ms": stored_ms})


def key(activity, payload) -> bytes:
    return fingerprint(activity, payload).encode()


def table(*records, now=NOW, metrics=None, max_entries=100) -> ResultTable:
    t = ResultTable("unused:9092", TOPICS, metrics=metrics, clock=lambda: now, max_entries=max_entries)
    for k, v in records:
        t.apply(k, v)
    return t


def request(payload, ttl_ms=HOUR, activity="classify", attempt=1) -> ActivityRequested:
    return ActivityRequested(request_id=f"r1/classify/{attempt}", run_id="r1", step_id="classify", activity=activity, attempt=attempt,
                             input=payload, workflow="triage", requested_ms=NOW, cache_ttl_ms=ttl_ms)


# --- the table -----------------------------------------------------------------------------------------


def test_an_entry_is_fresh_until_its_ttl_has_passed():
    t = table((key("classify", {"q": 1}), entry("a", NOW - 1_000)))
    fp = fingerprint("classify", {"q": 1})
    assert t.fresh(fp, 2_000, NOW).output == "a"
    assert t.fresh(fp, 1_001, NOW) is not None
    assert t.fresh(fp, 1_000, NOW) is None, "stored_ms + ttl must be after now"
    assert t.fresh(fp, 2_000, NOW + 1_000) is None
    assert t.fresh(fingerprint("classify", {"q": 2}), HOUR, NOW) is None, "missing"
    assert t.fresh(fingerprint("other", {"q": 1}), HOUR, NOW) is None, "the activity is part of the key"


def test_the_key_is_the_canonical_json_of_the_input():
    assert fingerprint("a", {"x": 1, "y": [1, 2]}) == fingerprint("a", {"y": [1, 2], "x": 1})
    assert fingerprint("a", {"x": 1}) != fingerprint("a", {"x": 1.5})


def test_the_table_is_rebuilt_from_the_records_in_log_order():
    k1, k2, k3 = key("a", 1), key("a", 2), key("a", 3)
    log = [(k1, entry("old", NOW - 10)), (k2, entry("two", NOW - 5)), (k1, entry("new", NOW - 1)), (k3, entry("three", NOW)),
           (k3, None),  # a tombstone removes the entry
           (None, entry("no key", NOW)), (k2, b"not json"), (k2, b'{"output": 1}'),  # unusable records are skipped
           (key("a", 4), orjson.dumps({"output": None, "stored_ms": NOW, "extra": True}))]  # a minimal entry (no confidence)
    rebuilt, again = table(*log), table(*log)
    for t in (rebuilt, again):
        assert len(t) == 3
        assert t.fresh(k1.decode(), HOUR, NOW).output == "new"
        assert t.fresh(k2.decode(), HOUR, NOW).output == "two"
        assert t.fresh(k3.decode(), HOUR, NOW) is None
        assert t.fresh(key("a", 4).decode(), HOUR, NOW) == CachedResult(output=None, stored_ms=NOW)


def test_the_least_recently_written_entries_go_first_past_the_bound():
    t = table(*[(key("a", i), entry(i, NOW)) for i in range(5)], max_entries=3)
    t.apply(key("a", 2), entry("again", NOW))
    t.apply(key("a", 5), entry(5, NOW))
    assert [i for i in range(6) if t.fresh(key("a", i).decode(), HOUR, NOW)] == [2, 4, 5]


# --- hit or miss -----------------------------------------------------------------------------------------


def test_a_fresh_entry_answers_the_request_with_a_cached_completion():
    metrics = Metrics()
    t = table((key("classify", {"q": 1}), entry({"label": "x"}, NOW - 1_000, confidence=0.8)), metrics=metrics)
    hit = t.answer(request({"q": 1}, attempt=2))
    assert hit == ActivityCompleted(request_id="r1/classify/2", run_id="r1", step_id="classify", attempt=2, status="succeeded",
                                    output={"label": "x"}, confidence=0.8, cached=True)
    assert t.answer(request({"q": 2})) is None, "no entry: a miss"
    assert t.answer(request({"q": 1}, ttl_ms=1_000)) is None, "expired for this step's ttl: a miss"
    assert metrics.registry.get_sample_value("legato_cache_hits_total", {"workflow": "triage", "step": "classify"}) == 1
    assert metrics.registry.get_sample_value("legato_cache_misses_total", {"workflow": "triage", "step": "classify"}) == 2


def test_a_request_without_cache_is_never_answered_nor_counted():
    metrics = Metrics()
    t = table((key("classify", {"q": 1}), entry("a", NOW)), metrics=metrics)
    assert t.answer(request({"q": 1}, ttl_ms=None)) is None
    assert metrics.registry.get_sample_value("legato_cache_misses_total", {"workflow": "triage", "step": "classify"}) is None


def _carry(commands, cache):
    sends, timers, ignored = [], [], []
    carry_out(commands, TOPICS, sends, timers, ignored.append, lambda reason: None, cache)
    return sends


def test_a_hit_sends_the_cached_completion_instead_of_the_request():
    t = table((key("classify", {"q": 1}), entry("a", NOW)))
    [(topic, k, value, partition)] = _carry([RequestActivity(request=request({"q": 1}))], t)
    assert (topic, k, partition) == (TOPICS.completions, b"r1", None)
    completion = codec.decode(ActivityCompleted, value)
    assert completion.cached is True and completion.request_id == "r1/classify/1" and completion.output == "a"


@pytest.mark.parametrize("cache", ["miss", "none"])
def test_a_miss_or_no_table_sends_the_request(cache):
    t = table() if cache == "miss" else None
    req = request({"q": 1})
    [(topic, k, value, _)] = _carry([RequestActivity(request=req)], t)
    assert (topic, k) == (TOPICS.requests("classify"), b"r1")
    assert codec.decode(ActivityRequested, value) == req


def test_a_stored_result_is_written_to_the_cache_topic_under_its_fingerprint_with_every_field():
    command = CacheResult(activity="classify", input={"q": 1}, result=CachedResult(output=[1], stored_ms=NOW))
    [(topic, k, value, partition)] = _carry([command], None)
    assert (topic, k, partition) == (TOPICS.cache, key("classify", {"q": 1}), None)
    assert orjson.loads(value) == {"output": [1], "confidence": None, "stored_ms": NOW}
    t = table((k, value))  # what every coordinator's table reads back
    assert t.answer(request({"q": 1})).output == [1]


# --- through a partition's batch ----------------------------------------------------------------------------

WORKFLOW = """
name: triage
steps:
  - id: classify
    activity: classify
    input: {q: "${ input.q }"}
    cache: {ttl: 1h}
"""


_OFFSETS = itertools.count()


def _batch(partitions, task, records):
    """Decide ``records`` (topic, value) as one polled batch of partition 0; the records the batch would produce."""
    msgs = [SimpleNamespace(topic=topic, partition=0, offset=next(_OFFSETS), key=None, value=value) for topic, value in records]
    by_tp = {}
    for m in msgs:
        by_tp.setdefault(TopicPartition(m.topic, 0), []).append(m)
    batch = partitions._decide_batch(task, [(tp, ms, 0.0) for tp, ms in by_tp.items()])
    for tp, offset in batch.offsets.items():
        task.next_offset[tp] = offset
    return batch.sends


def test_a_batch_answers_a_hit_and_stores_a_miss_answered_by_a_plain_worker():
    metrics = Metrics()
    wf = compile_yaml(WORKFLOW)
    metrics.declare([wf])
    cache = table((key("classify", {"q": "cached"}), entry("from cache", NOW - 1_000)), metrics=metrics)
    partitions = Partitions(Machine({"triage": wf}), TOPICS, "g", Inbox(TOPICS, 1), metrics, cache=cache)
    task = PartitionTask(0, None, RunTable(None))
    accepted = lambda run_id, q: codec.dumps(RunAccepted(run_id=run_id, workflow="triage", input={"q": q}))  # noqa: E731
    hits = lambda: metrics.registry.get_sample_value("legato_cache_hits_total", {"workflow": "triage", "step": "classify"})  # noqa: E731
    misses = lambda: metrics.registry.get_sample_value("legato_cache_misses_total", {"workflow": "triage", "step": "classify"})  # noqa: E731
    assert (hits(), misses()) == (0, 0), "declared at 0"

    # a hit: no request, a cached completion to the completions topic; the step stays pending until it is decided
    sends = _batch(partitions, task, [(TOPICS.coordinator, accepted("r1", "cached"))])
    assert [s[0] for s in sends if s[0].startswith(TOPICS.requests(""))] == []
    [answer] = [codec.decode(ActivityCompleted, v) for t, _, v, _ in sends if t == TOPICS.completions]
    assert answer.cached is True and answer.output == "from cache"
    sends = _batch(partitions, task, [(TOPICS.completions, codec.dumps(answer))])
    assert not [s for s in sends if s[0] == TOPICS.cache], "a cached answer is not stored again"
    state = partitions.states.load("r1", task.store.get(b"r1"))
    assert state.status == "succeeded" and state.steps["classify"].cached is True and state.output == "from cache"

    # a miss: the request goes out; a worker that knows nothing of the cache answers; the batch stores the result
    sends = _batch(partitions, task, [(TOPICS.coordinator, accepted("r2", "new"))])
    [req] = [codec.decode(ActivityRequested, v) for t, _, v, _ in sends if t == TOPICS.requests("classify")]
    plain = ActivityCompleted(request_id=req.request_id, run_id="r2", step_id="classify", attempt=1, status="succeeded", output="fresh")
    sends = _batch(partitions, task, [(TOPICS.completions, codec.dumps(plain))])
    [(k, value)] = [(k, v) for t, k, v, _ in sends if t == TOPICS.cache]
    assert k == key("classify", {"q": "new"}) and orjson.loads(value)["output"] == "fresh"
    assert (hits(), misses()) == (1, 1)
