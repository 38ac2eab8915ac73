"""The run index on its own: records in, views out (no Kafka)."""
from __future__ import annotations

import orjson

from legato.streams.console.index import RunFilter, RunIndex
from legato.topics.names import Topics

T = Topics("legato")


def state(run_id: str, **over) -> bytes:
    doc = {"run_id": run_id, "workflow": "wf", "version": 1, "status": "running", "input": {"x": 1}, "started_ms": 1000,
           "steps": {"a": {"key": "a", "step_id": "a", "kind": "activity", "frame": "root", "status": "running", "started_ms": 1000}}}
    doc.update(over)
    return orjson.dumps(doc)


def run_event(run_id: str, type_: str = "run.started", status: str = "running", **over) -> bytes:
    doc = {"type": type_, "run_id": run_id, "workflow": "wf", "status": status, "started_at": "2026-01-01T00:00:01Z"}
    doc.update(over)
    return orjson.dumps(doc)


class Log:
    """Records with increasing offsets per topic (one partition each is enough here)."""

    def __init__(self):
        self.records = []

    def add(self, topic, key, value, ts=1000):
        offset = sum(1 for r in self.records if r[0] == topic)
        self.records.append((topic, 0, offset, key.encode() if key else None, value, ts))
        return self


def fill(index: RunIndex, log: Log) -> None:
    index.apply_all(log.records)


def sample_log() -> Log:
    log = Log()
    log.add(T.coordinator, "r1", orjson.dumps({"type": "run.accepted", "run_id": "r1", "workflow": "wf", "correlation_id": "order-7"}), 1000)
    log.add(T.runs, "r1", run_event("r1"), 1001)
    log.add(T.changelog, "r1", state("r1", correlation_id="order-7"), 1002)
    log.add(T.requests("act"), "r1", orjson.dumps({"request_id": "r1/a/1", "run_id": "r1", "step_id": "a", "activity": "act", "attempt": 1}), 1003)
    log.add(T.completions, "r1", orjson.dumps({"request_id": "r1/a/1", "run_id": "r1", "step_id": "a", "attempt": 1, "status": "succeeded", "output": 5}), 1004)
    log.add(T.changelog, "r1", state("r1", status="succeeded", finished_ms=1005, output=5, correlation_id="order-7"), 1005)
    log.add(T.runs, "r1", run_event("r1", "run.completed", "succeeded", output=5, finished_at="2026-01-01T00:00:02Z"), 1006)
    log.add(T.changelog, "r2", state("r2", workflow="other", version=3, started_ms=2000), 2000)
    log.add(T.changelog, "r3", state("r3", status="failed", started_ms=3000, finished_ms=3100, error={"type": "Boom", "message": "no"}), 3000)
    return log


def test_runs_from_every_source_and_history_with_offsets():
    index = RunIndex(":memory:", "legato")
    fill(index, sample_log())
    run = index.get_run("r1")
    assert run["status"] == "succeeded" and run["workflow"] == "wf" and run["version"] == 1 and run["correlation_id"] == "order-7"
    assert run["state"]["output"] == 5 and run["summary"]["output"] == 5
    history = [(e["topic"], e["partition"], e["offset"], e["kind"]) for e in index.events("r1")]
    assert history == [
        (T.coordinator, 0, 0, "run.accepted"),
        (T.runs, 0, 0, "run.started"),
        (T.requests("act"), 0, 0, "activity.requested"),
        (T.completions, 0, 0, "activity.succeeded"),
        (T.runs, 0, 1, "run.completed"),
    ]


def test_filters_counts_and_order():
    index = RunIndex(":memory:", "legato")
    fill(index, sample_log())
    assert [r["run_id"] for r in index.list_runs()] == ["r3", "r2", "r1"]
    assert [r["run_id"] for r in index.list_runs(RunFilter(workflow="wf"))] == ["r3", "r1"]
    assert [r["run_id"] for r in index.list_runs(RunFilter(status="failed"))] == ["r3"]
    assert [r["run_id"] for r in index.list_runs(RunFilter(version=3))] == ["r2"]
    assert [r["run_id"] for r in index.list_runs(RunFilter(since_ms=1500, until_ms=2500))] == ["r2"]
    assert [r["run_id"] for r in index.list_runs(RunFilter(q="order-7"))] == ["r1"]
    assert [r["run_id"] for r in index.list_runs(RunFilter(q="r"))] == ["r3", "r2", "r1"]
    assert [r["run_id"] for r in index.list_runs(limit=1, offset=1)] == ["r2"]
    assert index.counts() == {"succeeded": 1, "running": 1, "failed": 1}
    assert index.counts(RunFilter(workflow="wf", status="failed")) == {"succeeded": 1, "failed": 1}


def test_a_finished_run_never_goes_back_to_running():
    # the runs topic and the changelog are read in any order relative to each other
    log = Log()
    log.add(T.changelog, "r1", state("r1", status="succeeded", finished_ms=1005), 1005)
    log.add(T.runs, "r1", run_event("r1"), 1001)
    log.add(T.coordinator, "r1", orjson.dumps({"type": "run.accepted", "run_id": "r1", "workflow": "wf"}), 1000)
    index = RunIndex(":memory:", "legato")
    fill(index, log)
    assert index.get_run("r1")["status"] == "succeeded"


def test_a_run_known_only_from_the_runs_topic_is_listed():
    log = Log().add(T.runs, "r9", run_event("r9", "run.failed", "failed", error={"type": "X", "message": "m"}, finished_at="2026-01-01T00:00:03Z"))
    index = RunIndex(":memory:", "legato")
    fill(index, log)
    run = index.get_run("r9")
    assert run["status"] == "failed" and run["started_ms"] == 1767225601000 and run["finished_ms"] == 1767225603000
    assert run["summary"]["error"]["type"] == "X"


def test_tombstone_forgets_the_run_and_its_history_even_when_other_topics_come_later():
    log = sample_log()
    log.add(T.changelog, "r1", None, 5000)
    log.add(T.runs, "r1", run_event("r1", "run.completed", "succeeded"), 5001)  # read after the tombstone
    index = RunIndex(":memory:", "legato")
    fill(index, log)
    assert index.get_run("r1") is None and index.events("r1") == []
    assert [r["run_id"] for r in index.list_runs()] == ["r3", "r2"]


def test_lenient_decoding_of_newer_states_and_bad_records():
    log = Log()
    log.add(T.changelog, "w1", state("w1", schema_version=2, status="waiting",
                                     steps={"approve": {"key": "approve", "step_id": "approve", "kind": "wait", "frame": "root",
                                                        "status": "waiting", "signal": "approval", "started_ms": 1000}}))
    log.add(T.runs, "x", b"not json")
    log.add(T.completions, "x", b"[1, 2]")
    log.add(T.signals, "w1", orjson.dumps({"run_id": "w1", "signal": "approval", "data": {"ok": True}}), 1001)
    log.add(T.progress, "w1", orjson.dumps({"run_id": "w1", "step_id": "approve", "request_id": "q", "seq": 0, "chunk": "tok"}), 1002)
    index = RunIndex(":memory:", "legato")
    fill(index, log)
    run = index.get_run("w1")
    assert run["status"] == "waiting" and run["state"]["steps"]["approve"]["signal"] == "approval"
    assert [e["kind"] for e in index.events("w1")] == ["signal.sent", "progress.reported"]
    assert index.positions()[(T.runs, 0)] == 1 and index.positions()[(T.completions, 0)] == 1


def test_deleting_the_file_rebuilds_the_same_view(tmp_path):
    log = sample_log()
    path = tmp_path / "index.sqlite"
    index = RunIndex(path, "legato")
    fill(index, log)
    before = (index.list_runs(), index.counts(), index.events("r1"), index.get_run("r1"))
    index.close()
    path.unlink()
    for extra in tmp_path.iterdir():  # the WAL and shared-memory files go with it
        extra.unlink()
    again = RunIndex(path, "legato")
    assert again.list_runs() == [] and again.positions() == {}
    fill(again, log)
    assert (again.list_runs(), again.counts(), again.events("r1"), again.get_run("r1")) == before


def test_reopened_index_keeps_positions_and_a_replayed_record_changes_nothing(tmp_path):
    log = sample_log()
    path = tmp_path / "index.sqlite"
    index = RunIndex(path, "legato")
    fill(index, log)
    index.close()
    index = RunIndex(path, "legato")
    assert index.positions()[(T.changelog, 0)] == 4
    fill(index, log)  # at-least-once delivery after a crash
    assert len(index.events("r1")) == 5 and index.counts() == {"succeeded": 1, "running": 1, "failed": 1}


def test_definitions_are_kept_by_name_and_version():
    log = Log()
    for v in (1, 2):
        log.add(T.definitions, f"wf@{v}", orjson.dumps({"name": "wf", "version": v, "sha256": "0" * 64, "source": f"name: wf\nversion: {v}\n", "deployed_at": "x"}))
    index = RunIndex(":memory:", "legato")
    fill(index, log)
    assert index.definition("wf", 1) == "name: wf\nversion: 1\n" and index.definition("wf", None).endswith("2\n")
    assert index.definition("nope", None) is None


def test_documents_stored_without_defaults_read_with_them():
    # the coordinator stores model_dump_json(exclude_defaults=True): a running run has no "status"
    doc = {"run_id": "d1", "workflow": "wf", "version": 1, "started_ms": 5,
           "steps": {"w": {"key": "w", "step_id": "w", "kind": "wait", "frame": "root", "signal": "go"}}}
    log = Log().add(T.changelog, "d1", orjson.dumps(doc)).add(T.coordinator, "d1", orjson.dumps({"type": "run.accepted", "run_id": "d1", "workflow": "wf"}))
    index = RunIndex(":memory:", "legato")
    fill(index, log)
    run = index.get_run("d1")
    assert run["status"] == "running" and run["state"]["status"] == "running" and run["state"]["input"] == {}
    assert run["state"]["steps"]["w"]["status"] == "running" and run["state"]["steps"]["w"]["attempt"] == 0
    assert run["state"]["steps"]["w"]["signal"] == "go"
