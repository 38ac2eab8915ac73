"""``streams.schedules``: the schedule table built from ``<prefix>.schedules`` records, and which runs are a schedule's."""
from __future__ import annotations

import orjson

from legato.streams.schedules import ScheduleTable, fired_key, schedule_of
from legato.workflows.schedule import ScheduleFired, ScheduleSpec, manual_run_id, run_id


def _spec(created_ms: int = 1000) -> bytes:
    return orjson.dumps(ScheduleSpec(name="a-b", workflow="wf", every_ms=1000, created_ms=created_ms).model_dump())


def _fired(last: int, created_ms: int = 1000) -> bytes:
    return orjson.dumps(ScheduleFired(name="a-b", created_ms=created_ms, last_tick_ms=last).model_dump())


def test_a_fired_record_never_moves_a_schedule_back_and_tombstones_delete():
    table = ScheduleTable()
    table.on_record(b"a-b", _spec())
    table.on_record(fired_key("a-b"), _fired(5000))
    table.on_record(fired_key("a-b"), _fired(3000))  # a coordinator that no longer owns the schedule, late
    assert table.fired["a-b"].last_tick_ms == 5000
    table.on_record(fired_key("a-b"), _fired(2000, created_ms=9000))  # the schedule created again: a fresh start
    assert table.fired["a-b"].last_tick_ms == 2000
    table.on_record(fired_key("a-b"), None)
    table.on_record(b"a-b", None)
    assert table.specs == {} and table.fired == {}


def test_bad_records_are_left_out_of_the_table():
    table = ScheduleTable()
    table.on_record(b"x", b"not json")
    table.on_record(b"y", orjson.dumps({"type": "schedule.defined", "name": "y", "workflow": "wf", "created_ms": 1}))  # no rule
    table.on_record(fired_key("z"), b"[]")
    table.on_record(None, _spec())
    assert table.specs == {} and table.fired == {}


def test_a_run_belongs_to_the_schedule_its_id_names_and_manual_runs_to_none():
    assert schedule_of(run_id("a-b", 1_800_000_000_123)) == "a-b"
    assert schedule_of(run_id("sched-x", 5)) == "sched-x"
    assert schedule_of(manual_run_id("a-b", 5)) is None
    assert schedule_of("order-42") is None and schedule_of("sched-") is None
