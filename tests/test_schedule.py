"""``workflows.schedule``: cron parsing, next ticks (DST both ways), catchup, overlap and jitter, with the clock as
an argument."""
from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from legato.workflows.schedule import Cron, ScheduleError, ScheduleFired, ScheduleSpec, due, jitter_of, next_tick, parse_every, run_id, ticks_between

PARIS = ZoneInfo("Europe/Paris")
UTC = ZoneInfo("UTC")


def ms(text: str, tz: ZoneInfo = UTC, fold: int = 0) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=tz, fold=fold).timestamp() * 1000)


def spec(**kw) -> ScheduleSpec:
    base = {"name": "s", "workflow": "wf", "created_ms": ms("2026-01-01T00:00:00")}
    return ScheduleSpec(**{**base, **kw})


def fired(s: ScheduleSpec, last: int, buffered: int | None = None) -> ScheduleFired:
    return ScheduleFired(name=s.name, created_ms=s.created_ms, last_tick_ms=last, buffered_tick_ms=buffered)


# --- cron -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, after, expected", [
    ("0 9 * * MON-FRI", "2026-03-06T09:00:00", "2026-03-09T09:00:00"),  # Friday 9:00 -> Monday 9:00
    ("*/15 * * * *", "2026-03-06T10:07:00", "2026-03-06T10:15:00"),
    ("0 0 1 JAN *", "2026-03-06T00:00:00", "2027-01-01T00:00:00"),
    ("30 2 * * 7", "2026-03-06T00:00:00", "2026-03-08T02:30:00"),  # 7 is Sunday
    ("0 12 13 * FRI", "2026-03-06T00:00:00", "2026-03-06T12:00:00"),  # both day fields: either matches (a Friday)
    ("5-10/5 1,3 * * *", "2026-03-06T01:05:00", "2026-03-06T01:10:00"),
])
def test_cron_next_tick_in_utc(text, after, expected):
    assert Cron(text).next_after(ms(after), UTC) == ms(expected)


@pytest.mark.parametrize("text, where", [
    ("0 9 * *", "expected 5 fields"), ("60 * * * *", "minute: 60 is outside 0-59"), ("* * * * FUNDAY", "day of week"),
    ("5-1 * * * *", "runs backwards"), ("*/0 * * * *", "step must be at least 1"), ("0 0 30 2 *", "no tick"),
])
def test_bad_cron_says_which_field_and_why(text, where):
    with pytest.raises(ScheduleError, match=where):
        Cron(text).next_after(0, UTC)


def test_a_spec_needs_exactly_one_rule_a_known_timezone_and_a_plain_name():
    with pytest.raises(ValidationError, match="exactly one of cron and every"):
        spec()
    with pytest.raises(ValidationError, match="exactly one of cron and every"):
        spec(cron="* * * * *", every_ms=60_000)
    with pytest.raises(ValidationError, match="unknown timezone 'Mars/Olympus'"):
        spec(cron="* * * * *", timezone="Mars/Olympus")
    with pytest.raises(ValidationError, match="schedule name"):
        spec(name="a b", cron="* * * * *")
    with pytest.raises(ScheduleError, match="at least 1s"):
        parse_every("500ms")
    assert parse_every("15m") == 900_000


# --- DST --------------------------------------------------------------------------------------------------------

def test_spring_forward_a_skipped_wall_time_fires_once_shifted_by_the_gap():
    # given a daily 02:30 in Paris; on 2026-03-29 the clocks jump from 02:00 to 03:00
    s = spec(cron="30 2 * * *", timezone="Europe/Paris")
    # when ticks are listed over the change
    ticks = ticks_between(s, ms("2026-03-27T12:00:00", PARIS), ms("2026-03-31T12:00:00", PARIS))
    # then the skipped 02:30 fires at 03:30 summer time, and the days around it at 02:30
    assert ticks == [ms("2026-03-28T02:30:00", PARIS), ms("2026-03-29T03:30:00", PARIS), ms("2026-03-30T02:30:00", PARIS), ms("2026-03-31T02:30:00", PARIS)]
    assert ticks[1] - ticks[0] == 24 * 3600_000 and ticks[2] - ticks[1] == 23 * 3600_000


def test_spring_forward_a_shifted_tick_that_meets_a_real_one_is_one_tick():
    s = spec(cron="30 2,3 * * *", timezone="Europe/Paris")
    ticks = ticks_between(s, ms("2026-03-29T00:00:00", PARIS), ms("2026-03-29T23:00:00", PARIS))
    assert ticks == [ms("2026-03-29T03:30:00", PARIS)]


def test_spring_forward_hourly_ticks_skip_the_missing_hour_without_doubling():
    s = spec(cron="0 * * * *", timezone="Europe/Paris")
    ticks = ticks_between(s, ms("2026-03-29T00:30:00", PARIS), ms("2026-03-29T04:30:00", PARIS))
    # 02:00 does not exist: shifted to 03:00, which is a tick anyway
    assert ticks == [ms("2026-03-29T01:00:00", PARIS), ms("2026-03-29T03:00:00", PARIS), ms("2026-03-29T04:00:00", PARIS)]


def test_fall_back_a_repeated_wall_time_fires_once_at_its_first_occurrence():
    # given a daily 02:30 in Paris; on 2026-10-25 the clocks go from 03:00 back to 02:00
    s = spec(cron="30 2 * * *", timezone="Europe/Paris")
    ticks = ticks_between(s, ms("2026-10-24T12:00:00", PARIS), ms("2026-10-26T12:00:00", PARIS))
    first = ms("2026-10-25T02:30:00", PARIS, fold=0)
    assert ticks == [first, ms("2026-10-26T02:30:00", PARIS)]
    assert first == ms("2026-10-25T00:30:00")  # 02:30 summer time (UTC+2), not 02:30 winter time an hour later
    # and a coordinator looking again between the two occurrences fires nothing more that day
    assert next_tick(s, first + 1800_000) == ms("2026-10-26T02:30:00", PARIS)


def test_fall_back_hourly_ticks_are_two_hours_apart_across_the_repeated_hour():
    s = spec(cron="0 * * * *", timezone="Europe/Paris")
    ticks = ticks_between(s, ms("2026-10-25T00:30:00", PARIS), ms("2026-10-25T03:30:00", PARIS, fold=1))
    assert ticks == [ms("2026-10-25T01:00:00", PARIS), ms("2026-10-25T02:00:00", PARIS, fold=0), ms("2026-10-25T03:00:00", PARIS)]
    assert ticks[2] - ticks[1] == 2 * 3600_000


def test_every_counts_absolute_time_across_dst():
    s = spec(every_ms=3600_000, timezone="Europe/Paris", created_ms=ms("2026-03-29T00:00:00"))
    ticks = ticks_between(s, ms("2026-03-29T00:00:00"), ms("2026-03-29T03:00:00"))
    assert [b - a for a, b in zip(ticks, ticks[1:])] == [3600_000, 3600_000]


# --- due: catchup ----------------------------------------------------------------------------------------------

def test_a_new_every_schedule_fires_from_its_creation_one_run_per_tick():
    s = spec(every_ms=1000, created_ms=10_000)
    d = due(s, None, now_ms=12_500, running=False)
    assert d.fire == [10_000, 11_000, 12_000] and d.last_tick_ms == 12_000 and d.next_tick_ms == 13_000
    # given that record, looking again before the next tick fires nothing
    again = due(s, fired(s, d.last_tick_ms), now_ms=12_900, running=True)
    assert again.fire == [] and not again.changed


def test_after_a_coordinator_outage_ticks_within_catchup_fire_and_older_ones_are_skipped_as_late():
    # given a schedule every 10 s with a 30 s catchup, last fired at 100 s, and no coordinator until 200 s
    s = spec(every_ms=10_000, catchup_ms=30_000, created_ms=0)
    d = due(s, fired(s, 100_000), now_ms=200_000, running=False)
    # then the ticks 170..200 s fire, the 6 ticks 110..160 s are late
    assert d.fire == [170_000, 180_000, 190_000, 200_000]
    assert d.skipped_late == 6 and d.last_tick_ms == 200_000


def test_catchup_zero_fires_only_a_tick_that_is_exactly_now():
    s = spec(every_ms=10_000, catchup_ms=0, created_ms=0)
    assert due(s, fired(s, 100_000), now_ms=125_000, running=False).fire == []
    assert due(s, fired(s, 100_000), now_ms=130_000, running=False).fire == [130_000]


def test_a_long_outage_of_a_cron_counts_its_late_ticks_without_deciding_each():
    s = spec(cron="* * * * *", catchup_ms=120_000, created_ms=0)
    now = ms("2026-06-01T12:00:30")
    d = due(s, fired(s, ms("2026-06-01T10:00:00")), now_ms=now, running=False)
    assert d.fire == [ms("2026-06-01T11:59:00"), ms("2026-06-01T12:00:00")]
    assert d.skipped_late == 118  # 10:01 .. 11:58


def test_a_paused_schedule_decides_nothing_and_a_fired_record_of_an_older_definition_is_ignored():
    s = spec(every_ms=1000, created_ms=0, paused=True)
    d = due(s, fired(s, 5000), now_ms=9000, running=False)
    assert d.fire == [] and d.last_tick_ms == 5000
    # once resumed at 9.5 s, the ticks 6..9 s that came while paused are skipped, and 10 s fires
    resumed = spec(every_ms=1000, created_ms=0, resumed_ms=9500)
    after = due(resumed, fired(resumed, 5000), now_ms=10_000, running=False)
    assert after.fire == [10_000] and after.skipped_paused == 4 and after.skipped_late == 0
    recreated = spec(every_ms=1000, created_ms=8000)
    stale = ScheduleFired(name="s", created_ms=0, last_tick_ms=20_000)
    assert due(recreated, stale, now_ms=9000, running=False).fire == [8000, 9000]


# --- due: overlap ------------------------------------------------------------------------------------------------

def test_overlap_allow_fires_every_tick_while_a_run_is_going():
    s = spec(every_ms=1000, created_ms=0, overlap="allow")
    assert due(s, fired(s, 1000), now_ms=3000, running=True).fire == [2000, 3000]


def test_overlap_skip_skips_ticks_while_a_run_is_going_and_fires_one_when_none_is():
    s = spec(every_ms=1000, created_ms=0, overlap="skip")
    busy = due(s, fired(s, 1000), now_ms=3000, running=True)
    assert busy.fire == [] and busy.skipped_overlap == [2000, 3000] and busy.last_tick_ms == 3000
    idle = due(s, fired(s, 1000), now_ms=3000, running=False)
    assert idle.fire == [2000] and idle.skipped_overlap == [3000]  # the run it starts is going at 3000


def test_overlap_buffer_one_holds_one_tick_and_fires_it_when_the_run_finishes():
    s = spec(every_ms=1000, created_ms=0, overlap="buffer_one")
    busy = due(s, fired(s, 1000), now_ms=4000, running=True)
    assert busy.fire == [] and busy.buffered_tick_ms == 2000 and busy.skipped_overlap == [3000, 4000]
    done = due(s, fired(s, busy.last_tick_ms, busy.buffered_tick_ms), now_ms=4500, running=False)
    assert done.fire == [2000] and done.buffered_tick_ms is None
    # a tick that comes after the buffered one is started waits again (buffered anew)
    next_ = due(s, fired(s, 4000), now_ms=5000, running=True)
    assert next_.fire == [] and next_.buffered_tick_ms == 5000


# --- jitter and run ids -------------------------------------------------------------------------------------------

def test_jitter_delays_a_tick_by_a_fixed_amount_below_the_bound_and_keeps_its_run_id():
    s = spec(every_ms=60_000, jitter_ms=30_000, created_ms=0)
    delays = [jitter_of(s, t) for t in range(0, 60_000 * 50, 60_000)]
    assert all(0 <= j < 30_000 for j in delays) and len(set(delays)) > 10
    assert jitter_of(s, 60_000) == jitter_of(s, 60_000)
    j = jitter_of(s, 60_000)
    assert due(s, fired(s, 0), now_ms=60_000 + j - 1, running=False).fire == []
    assert due(s, fired(s, 0), now_ms=60_000 + j, running=False).fire == [60_000]


def test_run_ids_are_derived_from_the_name_and_the_tick():
    assert run_id("report", ms("2026-12-07T08:00:00")) == "sched-report-20261207T080000.000Z"
    assert run_id("report", 1) != run_id("report", 2) and run_id("a", 1) != run_id("b", 1)


def test_nothing_due_is_no_change_so_the_firing_coordinator_writes_nothing():
    # given a weekday 9:00 cron created on a Saturday, looked at before its first tick, with or without a record
    s = spec(cron="0 9 * * MON-FRI", created_ms=ms("2026-03-07T10:00:00"))
    for record in (None, fired(s, ms("2026-03-07T10:00:00") - 1)):
        d = due(s, record, now_ms=ms("2026-03-08T12:00:00"), running=False)
        # then nothing is decided, and the next look is Monday 9:00
        assert not d.changed and d.fire == [] and d.next_tick_ms == ms("2026-03-09T09:00:00")
