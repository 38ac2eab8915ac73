"""legato.streams.runs: rendering states produced by the Machine, and reading a changelog-shaped topic on a real broker."""
from __future__ import annotations

import re
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from legato.streams.metrics import Metrics
from legato.streams.runs import load_run, render_gantt, render_table
from legato.topics.names import Topics
from tests.test_metrics import T0, TRIAGE, FRAGILE, Run, drive_triage, machine


def test_table_shows_each_step_and_the_totals():
    state = drive_triage(Metrics()).state
    text = render_table(state)
    lines = text.splitlines()
    assert lines[0] == "run r1  workflow triage v1  status succeeded"
    header = next(line for line in lines if line.startswith("step "))
    assert header.split() == ["step", "kind", "status", "attempt", "start_ms", "duration_ms", "path", "iterations", "cost", "output"]
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in state.steps}
    assert rows["classify"][1:6] == ["activity", "succeeded", "1", "0", "100"]
    assert rows["enrich"][1:6] == ["parallel", "succeeded", "-", "100", "200"]
    assert rows["route"][6] == "default"
    assert rows["route/default/draft"][7:9] == ["3", "(until)"]
    assert "$0.0010 205 tok small-llm" in text
    assert "duration  600 ms" in text
    assert "path      route:default" in text
    assert "by model  large-llm $0.0120, small-llm $0.0010" in text


def test_table_of_a_failed_run_shows_the_error():
    run = Run(machine(FRAGILE), Metrics())
    run.start("fragile")
    run.fail("a", T0 + 20, "Refused")
    text = render_table(run.state)
    assert "status failed" in text
    assert "error     Refused: no" in text
    assert re.search(r"checks/b/b\s+activity\s+cancelled", text)


def test_gantt_has_a_task_per_step_and_parallel_branches_overlap():
    state = drive_triage(Metrics()).state
    chart = render_gantt(state)
    lines = chart.splitlines()
    assert lines[0] == "gantt"
    assert "    dateFormat x" in lines
    assert any(line.startswith("    axisFormat ") for line in lines)
    tasks = [line for line in lines if re.search(r":\S*.*s\d+, \d+, \d+$", line)]
    assert len(tasks) == len(state.steps)
    spans = {}
    for line in tasks:
        name, _, spec = line.strip().rpartition(" :")
        start, end = (int(x) for x in spec.split(", ")[-2:])
        assert end > start
        spans[name.split(" (")[0]] = (start, end)
    customer, history = spans["enrich/customer/customer"], spans["enrich/history/history"]
    assert customer[0] < history[1] and history[0] < customer[1], "parallel branches must overlap"
    assert spans["enrich"] == (T0 + 100, T0 + 300)
    assert "section enrich" in chart and "section route" in chart
    assert "#" not in chart.split("dateFormat")[1], "'#' starts a comment in mermaid"


def test_gantt_marks_failed_steps_critical():
    run = Run(machine(FRAGILE), Metrics())
    run.start("fragile")
    run.fail("a", T0 + 20, "Refused")
    assert re.search(r"checks/a/a \(activity, failed\) :crit, s\d+, ", render_gantt(run.state))


async def test_load_run_reads_the_last_value_of_the_key_from_its_partition(kafka_bootstrap):
    prefix = f"rs{uuid.uuid4().hex[:10]}"
    topic = Topics(prefix).changelog
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
    finally:
        await admin.close()
    first = drive_triage(Metrics(), run_id="run-a")
    m = machine(TRIAGE)
    running = Run(m, Metrics(), "run-a")
    running.start("triage", {"text": "x"})
    other = drive_triage(Metrics(), run_id="run-b")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        # the default partitioner (murmur2 of the key), like faust's changelog
        await producer.send_and_wait(topic, running.state.model_dump_json().encode(), key=b"run-a")
        await producer.send_and_wait(topic, first.state.model_dump_json(exclude_defaults=True).encode(), key=b"run-a")
        await producer.send_and_wait(topic, other.state.model_dump_json().encode(), key=b"run-b")
    finally:
        await producer.stop()
    state = await load_run(kafka_bootstrap, prefix, "run-a")
    assert state is not None and state.run_id == "run-a" and state.status == "succeeded"
    assert state.model_dump() == first.state.model_dump()
    assert (await load_run(kafka_bootstrap, prefix, "run-b")).run_id == "run-b"
    assert await load_run(kafka_bootstrap, prefix, "nope") is None


def test_table_names_the_signal_a_waiting_step_waits_for():
    from tests.machine_helpers import accepted, machine_from

    m = machine_from("name: approve\nversion: 1\nsteps:\n  - id: approval\n    wait: {signal: manager_ok, timeout: 1h}\n")
    state, _ = m.decide(None, accepted("approve"), 1_000)
    row = next(line for line in render_table(state).splitlines() if line.startswith("approval"))
    assert "waiting (manager_ok)" in row, row
