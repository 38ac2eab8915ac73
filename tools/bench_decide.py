"""``python -m legato.tools.bench_decide``: the coordinator's CPU per completion, without a broker.

Drives ``bench_sequential`` (the chain of 20 no-op steps of ``legato bench``) through the coordinator's own
decision of a polled batch — ``Partitions._decide_batch`` with its inbox decoding, decoded-state cache,
``Machine.decide_events``, ``carry_out``, the metrics and the stored state — one run at a time, answering each
request the way the measuring worker of ``legato bench`` does. Only Kafka is faked: the polled records are plain
objects and nothing is sent or committed (the batch's offsets are taken as committed), so what is timed is what
``legato bench latency`` reports as "polled → decided".

``--fanout N`` drives ``bench_fanout`` instead (the ``map`` over N no-op items of ``legato bench fanout``): every
request the coordinator sends is answered in the next polled batch, and the figure is the CPU per branch, what
``legato bench fanout`` reports for the coordinator process without its Kafka client's share.

``--profile`` prints the top of a cProfile of the timed completions; run it under ``valgrind --tool=callgrind``
with ``--runs`` small for instruction counts that do not depend on the machine's load.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import itertools
import pstats
import statistics
import sys
import time
import uuid
from typing import Any

import orjson
from aiokafka import TopicPartition

from legato.streams.config import DEFAULT_PARTITIONS
from legato.streams.coordinator.cache import ResultTable
from legato.streams.coordinator.inbox import Inbox
from legato.streams.coordinator.partition import Partitions
from legato.streams.coordinator.table import RunTable
from legato.streams.coordinator.task import PartitionTask
from legato.streams.kafka_io import partition_for
from legato.streams.metrics import Metrics
from legato.tools.bench import ACTIVITY, FANOUT_YAML, _sequential_yaml
from legato.topics.names import Topics
from legato.workflows.catalog import Catalog, Definition, source_sha256
from legato.workflows.machine import Machine
from legato.workflows.model import load_source

STEPS = 20


class _Record:
    """What the coordinator reads of an aiokafka ``ConsumerRecord``."""

    __slots__ = ("topic", "partition", "offset", "key", "value", "timestamp", "headers")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes, value: bytes):
        self.topic, self.partition, self.offset, self.key, self.value = topic, partition, offset, key, value
        self.timestamp = int(time.time() * 1000)
        self.headers = ()


class Shell:
    """One coordinator process's ``Partitions`` over ``partitions`` tasks, with the transaction faked."""

    def __init__(self, partitions: int = DEFAULT_PARTITIONS, source: str | None = None):
        source = source if source is not None else _sequential_yaml("bench_sequential", STEPS)
        wf = load_source(source, "bench.yaml")
        self.topics = Topics()
        self.metrics = Metrics()
        self.metrics.declare([wf])
        catalog = Catalog.of([Definition(wf, source_sha256(source))])
        cache = ResultTable("localhost:0", self.topics, metrics=self.metrics)
        self.partitions = Partitions(Machine(lambda: catalog), self.topics, self.topics.coordinator_group, Inbox(self.topics, partitions),
                                     self.metrics, cache=cache)
        self.count = partitions
        self.tasks = [PartitionTask(p, None, RunTable(None)) for p in range(partitions)]  # type: ignore[arg-type]
        self.offsets: dict[tuple[str, int], itertools.count] = {}
        self.requests_topic = self.topics.requests(ACTIVITY)
        self.sent: list[tuple[str, bytes | None, bytes, int | None]] = []

    def poll(self, topic: str, key: bytes, value: bytes) -> tuple[PartitionTask, list[tuple[TopicPartition, list[Any], float]]]:
        """One polled record, as ``Coordinator._consume`` hands it to the task of its partition."""
        p = partition_for(key, self.count)
        offset = next(self.offsets.setdefault((topic, p), itertools.count()))
        return self.tasks[p], [(TopicPartition(topic, p), [_Record(topic, p, offset, key, value)], time.perf_counter())]

    def process(self, task: PartitionTask, parts: list) -> None:
        """Decide one polled batch; its records are what it would send, its offsets are taken as committed."""
        batch = self.partitions._decide_batch(task, parts)
        self.sent = list(getattr(batch, "early", ())) + batch.sends
        task.next_offset.update(batch.offsets)

    def request(self) -> dict[str, Any]:
        [value] = [v for t, _, v, _ in self.sent if t == self.requests_topic]
        return orjson.loads(value)


def run_once(shell: Shell, timings: list[float] | None, cpu: list[float] | None = None) -> None:
    """One run of ``bench_sequential``: its trigger, then each completion as the measuring worker sends it."""
    run_id = str(uuid.uuid4())
    key = run_id.encode()
    trigger = orjson.dumps({"workflow": "bench_sequential", "input": {}, "run_id": run_id})
    shell.process(*shell.poll(shell.topics.triggers, key, trigger))
    for step in range(STEPS):
        req = shell.request()
        completion = {k: req[k] for k in ("request_id", "run_id", "step_id", "attempt")}
        completion.update(status="succeeded", output=req.get("input"))
        task, parts = shell.poll(shell.topics.completions, key, orjson.dumps(completion))
        start, start_cpu = time.perf_counter(), time.thread_time()
        shell.process(task, parts)
        if timings is not None:
            timings.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.thread_time() - start_cpu)
    events = [orjson.loads(v) for t, _, v, _ in shell.sent if t == shell.topics.runs]
    if not events or events[-1].get("type") != "run.completed":
        raise RuntimeError(f"run {run_id} did not complete: {events}")


def fanout_once(shell: Shell, n: int) -> float:
    """One run of ``bench_fanout`` over ``n`` items; the process CPU seconds its decisions took per branch."""
    run_id = str(uuid.uuid4())
    key = run_id.encode()
    shell.process(*shell.poll(shell.topics.triggers, key, orjson.dumps({"workflow": "bench_fanout", "input": {"items": list(range(n))}, "run_id": run_id})))
    pending = [orjson.loads(v) for t, _, v, _ in shell.sent if t == shell.requests_topic]
    cpu = 0.0
    while pending:
        task, records = None, []
        for req in pending:
            completion = {k: req[k] for k in ("request_id", "run_id", "step_id", "attempt")}
            completion.update(status="succeeded", output=req.get("input"))
            task, [(tp, polled, _)] = shell.poll(shell.topics.completions, key, orjson.dumps(completion))
            records += polled
        start = time.process_time()
        shell.process(task, [(tp, records, time.perf_counter())])
        cpu += time.process_time() - start
        pending = [orjson.loads(v) for t, _, v, _ in shell.sent if t == shell.requests_topic]
    events = [orjson.loads(v) for t, _, v, _ in shell.sent if t == shell.topics.runs]
    if not events or events[-1].get("type") != "run.completed":
        raise RuntimeError(f"fan-out run {run_id} did not complete: {events[-1:]}")
    return cpu / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m legato.tools.bench_decide", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="timed runs per repetition (20 completions each)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions; the figures are the min and median over them")
    parser.add_argument("--warmup", type=int, default=50, help="untimed runs first")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the timed completions")
    parser.add_argument("--top", type=int, default=40, help="functions the profile shows")
    parser.add_argument("--fanout", type=int, default=0, metavar="N", help="time bench_fanout over N items instead (CPU per branch)")
    args = parser.parse_args(argv)

    if args.fanout:
        shell = Shell(source=FANOUT_YAML)
        fanout_once(shell, min(args.fanout, 500))  # warm-up
        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:
            profiler.enable()
        per_branch = [fanout_once(shell, args.fanout) * 1e6 for _ in range(1 if profiler else args.repeat)]
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)
        print(f"map N={args.fanout} ({len(per_branch)} runs): process CPU per branch min {min(per_branch):.1f} µs, median {statistics.median(per_branch):.1f} µs")
        return 0
    shell = Shell()
    for _ in range(args.warmup):
        run_once(shell, None)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.runs):
            run_once(shell, None)
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("cumulative").print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top)
        return 0
    p50s, cpus = [], []
    for _ in range(args.repeat):
        timings: list[float] = []
        cpu: list[float] = []
        gc.collect()
        for _ in range(args.runs):
            run_once(shell, timings, cpu)
        p50s.append(statistics.median(timings) * 1e6)
        cpus.append(statistics.fmean(cpu) * 1e6)
    # the thread's CPU time is less disturbed by other processes on a shared machine than the wall clock
    print(f"per completion ({args.repeat} x {args.runs} runs x {STEPS} completions): wall p50 min {min(p50s):.1f} µs, "
          f"median {statistics.median(p50s):.1f} µs; thread CPU mean min {min(cpus):.1f} µs, median {statistics.median(cpus):.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
