"""Schedules: cron expressions and intervals, their ticks, and what a tick does (pure: the clock is an argument).

A tick is an instant (epoch ms). Each tick starts at most one run, whose run_id is derived from the schedule's name
and the tick (``run_id``): a tick fired again is a duplicate trigger that the coordinator ignores.

Cron times are wall-clock times in the schedule's timezone. Daylight saving time:
- a wall time that a spring-forward skips (02:30 in Europe/Paris on the last Sunday of March) fires once, shifted
  forward by the gap (at 03:30 local time); if the shifted instant is also a tick of its own, that is one tick;
- a wall time that a fall-back repeats (02:30 on the last Sunday of October) fires once, at its first occurrence
  (02:30 summer time), never again an hour later.
``every`` schedules count absolute time from their anchor and do not see DST.
"""
from __future__ import annotations

import hashlib
import re
from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from legato.workflows.durations import parse_duration

Overlap = Literal["skip", "buffer_one", "allow"]
DEFAULT_CATCHUP_S = 3600.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_MONTHS = {m: i for i, m in enumerate(["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"], 1)}
_DAYS = {d: i for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}
_FIELDS = (("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}), ("month", 1, 12, _MONTHS), ("day of week", 0, 7, _DAYS))
_MAX_DAYS_AHEAD = 366 * 5  # "0 0 29 2 MON" first comes back after up to 28 years; refused as never firing in 5


class ScheduleError(ValueError):
    """A schedule that cannot be parsed or does not make sense; the message says which part and why."""


class Cron:
    """A five-field cron expression (minute hour day-of-month month day-of-week) with ``*``, lists, ranges, steps
    and names (``MON-FRI``, ``JAN``). As in Vixie cron, when both day fields are restricted a day matching either
    one matches; day of week 0 and 7 are Sunday."""

    def __init__(self, text: str):
        parts = text.split()
        if len(parts) != 5:
            raise ScheduleError(f"cron {text!r}: expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}")
        sets = [_field(p, *spec) for p, spec in zip(parts, _FIELDS)]
        self.text = text
        self.minutes, self.hours, self.days, self.months, dow = (sorted(s) for s in sets)
        self.weekdays = {d % 7 for d in dow}
        self.any_day = parts[2] == "*"
        self.any_weekday = parts[4] == "*"

    def matches_day(self, d: date) -> bool:
        if d.month not in self.months:
            return False
        by_day, by_weekday = d.day in self.days, (d.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return by_day and by_weekday
        return by_day or by_weekday

    def next_after(self, after_ms: int, tz: ZoneInfo) -> int:
        """The first tick strictly after ``after_ms``."""
        start = datetime.fromtimestamp(after_ms / 1000, tz=timezone.utc).astimezone(tz).date() - timedelta(days=1)
        best: int | None = None
        for offset in range(_MAX_DAYS_AHEAD):
            d = start + timedelta(days=offset)
            if best is not None and _instant(datetime(d.year, d.month, d.day), tz) > best + 86_400_000:
                return best  # a later day's ticks (even shifted by a DST gap) cannot come first
            if not self.matches_day(d):
                continue
            for h in self.hours:
                for m in self.minutes:
                    t = _instant(datetime(d.year, d.month, d.day, h, m), tz)
                    if t > after_ms and (best is None or t < best):
                        best = t
        if best is None:
            raise ScheduleError(f"cron {self.text!r} has no tick in the {_MAX_DAYS_AHEAD // 366} years after {iso(after_ms)}")
        return best


def _instant(wall: datetime, tz: ZoneInfo) -> int:
    """Epoch ms of a wall time: fold=0, so a repeated time is its first occurrence and a skipped time takes the offset
    before the gap (i.e. lands after the gap, shifted by its length)."""
    return int(wall.replace(tzinfo=tz, fold=0).timestamp() * 1000)


def _field(text: str, name: str, low: int, high: int, names: dict[str, int]) -> set[int]:
    values: set[int] = set()
    for item in text.split(","):
        body, _, step_text = item.partition("/")
        try:
            step = int(step_text) if step_text else 1
        except ValueError:
            raise ScheduleError(f"cron {name} {item!r}: the step {step_text!r} is not a number") from None
        if step < 1:
            raise ScheduleError(f"cron {name} {item!r}: the step must be at least 1")
        if body == "*":
            first, last = low, high
        else:
            a, dash, b = body.partition("-")
            first = _value(a, name, low, high, names)
            last = _value(b, name, low, high, names) if dash else (high if step_text else first)
            if last < first:
                raise ScheduleError(f"cron {name} {item!r}: the range runs backwards")
        values.update(range(first, last + 1, step))
    return values


def _value(text: str, name: str, low: int, high: int, names: dict[str, int]) -> int:
    upper = text.upper()
    if upper in names:
        return names[upper]
    if not text.isdigit():
        raise ScheduleError(f"cron {name}: {text!r} is not a number{' or a name' if names else ''}")
    value = int(text)
    if not low <= value <= high:
        raise ScheduleError(f"cron {name}: {value} is outside {low}-{high}")
    return value


class ScheduleSpec(BaseModel):
    """What ``legato schedule create`` publishes (``ScheduleDefined`` on ``<prefix>.schedules``, keyed by name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["schedule.defined"] = "schedule.defined"
    name: str
    workflow: str = Field(min_length=1, max_length=200)
    cron: str | None = None
    every_ms: int | None = Field(default=None, ge=1000)
    timezone: str = "UTC"
    input: dict[str, Any] = Field(default_factory=dict)
    overlap: Overlap = "allow"
    catchup_ms: int = Field(default=int(DEFAULT_CATCHUP_S * 1000), ge=0)
    jitter_ms: int = Field(default=0, ge=0)
    paused: bool = False
    resumed_ms: int | None = None  # when ``legato schedule resume`` ran: the ticks before it, paused, never fire
    created_ms: int = Field(ge=0)  # an ``every`` schedule ticks at created_ms + k * every_ms; no tick before it

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"schedule name {v!r}: letters, digits, '.', '_' and '-', at most 100, starting with a letter or digit")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r} (an IANA name such as Europe/Paris)") from None
        return v

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None:
            Cron(v)
        return v

    @model_validator(mode="after")
    def _one_rule(self) -> "ScheduleSpec":
        if (self.cron is None) == (self.every_ms is None):
            raise ValueError("a schedule has exactly one of cron and every")
        return self


class ScheduleFired(BaseModel):
    """What the firing coordinator records after each decision (key ``<name>`` + NUL + ``fired``): the last tick
    decided, the run it started, and a tick held back by ``buffer_one``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["schedule.fired"] = "schedule.fired"
    name: str
    created_ms: int  # the definition this belongs to: a schedule deleted and created again starts afresh
    last_tick_ms: int
    last_run_id: str | None = None
    buffered_tick_ms: int | None = None


def tz_of(spec: ScheduleSpec) -> ZoneInfo:
    return ZoneInfo(spec.timezone)


def next_tick(spec: ScheduleSpec, after_ms: int) -> int:
    """The first tick of ``spec`` strictly after ``after_ms`` (and not before the schedule was created)."""
    if spec.every_ms is not None:
        if after_ms < spec.created_ms:
            return spec.created_ms
        return spec.created_ms + ((after_ms - spec.created_ms) // spec.every_ms + 1) * spec.every_ms
    assert spec.cron is not None
    return Cron(spec.cron).next_after(max(after_ms, spec.created_ms - 1), tz_of(spec))


def ticks_between(spec: ScheduleSpec, after_ms: int, until_ms: int, limit: int = 100_000) -> list[int]:
    """Every tick in (after_ms, until_ms]; raises ScheduleError past ``limit`` ticks."""
    out: list[int] = []
    t = next_tick(spec, after_ms)
    while t <= until_ms:
        if len(out) >= limit:
            raise ScheduleError(f"more than {limit} ticks between {iso(after_ms)} and {iso(until_ms)}")
        out.append(t)
        t = next_tick(spec, t)
    return out


def jitter_of(spec: ScheduleSpec, tick_ms: int) -> int:
    """The delay (ms, in [0, jitter)) of a tick: fixed by the name and the tick, so every coordinator agrees."""
    if spec.jitter_ms <= 0:
        return 0
    digest = hashlib.sha256(f"{spec.name}@{tick_ms}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % spec.jitter_ms


def run_id(name: str, tick_ms: int) -> str:
    """The run_id of a schedule's tick: ``sched-<name>-<UTC tick>``, e.g. ``sched-report-20261207T080000.000Z``."""
    stamp = datetime.fromtimestamp(tick_ms / 1000, tz=timezone.utc).strftime("%Y%m%dT%H%M%S.") + f"{tick_ms % 1000:03d}Z"
    return f"sched-{name}-{stamp}"


def manual_run_id(name: str, now_ms: int) -> str:
    """The run_id of ``legato schedule trigger`` at ``now_ms``."""
    return run_id(name, now_ms).replace("sched-", "sched-manual-", 1)


class Due(BaseModel):
    """The decision for one schedule at one instant."""

    model_config = ConfigDict(frozen=True)

    fire: list[int] = Field(default_factory=list)  # ticks to start a run for, oldest first
    skipped_late: int = 0  # ticks older than catchup: never fired
    skipped_overlap: list[int] = Field(default_factory=list)  # the previous run was still going
    skipped_paused: int = 0  # ticks that came while the schedule was paused
    buffered_tick_ms: int | None = None  # held until the running run finishes (buffer_one)
    last_tick_ms: int  # every tick up to here is decided
    next_tick_ms: int  # when to look again (jitter not included)

    @property
    def changed(self) -> bool:
        return bool(self.fire or self.skipped_late or self.skipped_overlap or self.skipped_paused)


def due(spec: ScheduleSpec, fired: ScheduleFired | None, now_ms: int, running: bool) -> Due:
    """What ``spec`` does at ``now_ms``, given what was fired last and whether a run it started is still going.

    - Ticks in (last tick, now] whose fire time (tick + jitter) has come are decided, oldest first; with no fired
      record, ticks start after the schedule's creation.
    - A tick older than ``catchup`` at ``now`` is skipped as late (counted: a coordinator down longer misses it).
    - overlap ``allow`` fires every tick; ``skip`` fires a tick only when no run is going, else skips it;
      ``buffer_one`` holds one tick while a run is going (later ticks are skipped) and fires it once none is.
    - A paused schedule decides nothing; once resumed, the ticks that came while it was paused are skipped.
    """
    if fired is not None and fired.created_ms != spec.created_ms:
        fired = None
    last = fired.last_tick_ms if fired is not None else spec.created_ms - 1
    buffered = fired.buffered_tick_ms if fired is not None else None
    if spec.paused:
        return Due(last_tick_ms=last, buffered_tick_ms=buffered, next_tick_ms=next_tick(spec, max(last, now_ms)))
    paused = 0
    if spec.resumed_ms is not None and last < spec.resumed_ms - 1:
        first, end = next_tick(spec, last), next_tick(spec, spec.resumed_ms - 1)
        paused, last = (_count(spec, first, end) if first < end else 0), spec.resumed_ms - 1
    fire: list[int] = []
    overlapped: list[int] = []
    if buffered is not None and not running:
        fire.append(buffered)
        buffered, running = None, spec.overlap != "allow"
    t = next_tick(spec, last)
    late = 0
    horizon = now_ms - spec.catchup_ms
    if t < horizon:  # counted, not decided one by one: a schedule every second paused for a month is millions
        resume = next_tick(spec, horizon - 1)
        late = _count(spec, t, resume)
        last, t = resume - 1, resume
    while t + jitter_of(spec, t) <= now_ms:
        last = t
        if spec.overlap == "allow" or not running:
            fire.append(t)
            running = True
        elif spec.overlap == "buffer_one" and buffered is None:
            buffered = t
        else:
            overlapped.append(t)
        t = next_tick(spec, t)
    return Due(fire=fire, skipped_late=late, skipped_overlap=overlapped, skipped_paused=paused, buffered_tick_ms=buffered, last_tick_ms=last,
               next_tick_ms=t)


_COUNT_LIMIT = 10_000


def _count(spec: ScheduleSpec, first: int, end: int) -> int:
    """Ticks in [first, end) (a cron's counted up to 10,000)."""
    if spec.every_ms is not None:
        return (end - first + spec.every_ms - 1) // spec.every_ms
    n, t = 0, first
    while t < end and n < _COUNT_LIMIT:
        n, t = n + 1, next_tick(spec, t)
    return n


def parse_every(text: str) -> int:
    """``--every 15m`` as milliseconds (at least one second)."""
    try:
        ms = int(round(parse_duration(text) * 1000))
    except ValueError as exc:
        raise ScheduleError(f"--every: {exc}") from None
    if ms < 1000:
        raise ScheduleError(f"--every {text!r}: at least 1s")
    return ms


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
