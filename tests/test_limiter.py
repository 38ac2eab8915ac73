"""The pure limiter: rates within budget + burst over any window, concurrency never exceeded, pauses, priorities
with ageing (no starvation), duplicates and releases of unknown ids harmless, the state's JSON round trip."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from legato.topics.limits import LimitAcquire, LimitRelease, LimitSpec
from legato.workflows.limiter import AGEING_MS, ORDER_WAIT_MAX_MS, KeyState, bound, burst, decide, due_ms, idle, token_bound

T0 = 1_800_000_000_000


def acquire(i: int | str, spec: LimitSpec, priority: int = 3, cost: int = 0, key: str = "") -> LimitAcquire:
    return LimitAcquire(id=f"r{i}/a/1", limit="llm", key=key, run_id=f"r{i}", priority=priority, cost=cost, spec=spec)


def release(i: int | str, cost: int | None = None, pause_ms: int | None = None) -> LimitRelease:
    return LimitRelease(id=f"r{i}/a/1", limit="llm", cost=cost, pause_ms=pause_ms)


def test_a_rate_admits_one_interval_apart_after_its_burst():
    spec = LimitSpec(requests_per_minute=600)  # one per 100 ms, burst 2
    state, grants = None, []
    for i in range(10):
        state, g = decide(state, acquire(i, spec), T0)
        grants += g
    assert len(grants) == 1 + burst(600)  # the first, plus the burst
    now = T0
    while state.waiting:
        due = due_ms(state, now)
        assert due is not None and due > now
        now = due
        state, g = decide(state, None, now)
        grants += g
    assert len(grants) == 10
    assert [g.granted_ms for g in grants][3:] == sorted(g.granted_ms for g in grants[3:])
    gaps = [b.granted_ms - a.granted_ms for a, b in zip(grants[3:], grants[4:])]
    assert all(gap >= 105 for gap in gaps), gaps  # 100 ms paced at 92 %


def test_concurrency_waits_for_a_release_and_due_says_so():
    spec = LimitSpec(concurrency=2)
    state = None
    for i in range(3):
        state, g = decide(state, acquire(i, spec), T0)
    assert set(state.holders) == {"r0/a/1", "r1/a/1"}
    assert due_ms(state, T0) is None  # only a release lets the third in
    state, g = decide(state, release(0), T0 + 5)
    assert [x.id for x in g] == ["r2/a/1"] and g[0].waited_ms == 5


def test_a_repeated_acquisition_and_an_unknown_release_change_nothing():
    spec = LimitSpec(concurrency=1)
    state, g1 = decide(None, acquire(1, spec), T0)
    state, g2 = decide(state, acquire(1, spec), T0 + 1)  # sent again after a coordinator's crash
    state, g3 = decide(state, release("x"), T0 + 2)
    assert len(g1) == 1 and g2 == [] and g3 == [] and list(state.holders) == ["r1/a/1"] and not state.waiting


def test_releasing_a_waiter_takes_it_out_of_the_queue():
    spec = LimitSpec(concurrency=1)
    state, _ = decide(None, acquire(1, spec), T0)
    state, _ = decide(state, acquire(2, spec), T0)
    state, g = decide(state, release(2), T0 + 1)  # its step timed out while it waited
    state, g = decide(state, release(1), T0 + 2)
    assert g == [] and idle(state)


def test_a_429_pauses_the_whole_key_and_is_counted():
    spec = LimitSpec(concurrency=5)
    state, _ = decide(None, acquire(1, spec), T0)
    state, g = decide(state, release(1, pause_ms=2000), T0 + 10)
    state, g = decide(state, acquire(2, spec), T0 + 20)
    assert g == [] and state.pauses == 1 and due_ms(state, T0 + 20) == T0 + 2010
    state, g = decide(state, None, T0 + 2010)
    assert [x.id for x in g] == ["r2/a/1"]


def test_tokens_are_charged_up_front_and_corrected_on_release():
    spec = LimitSpec(tokens_per_minute=6000)  # 100 tokens/s paced at 92, burst 20 tokens
    state, g = decide(None, acquire(1, spec, cost=100), T0)
    assert len(g) == 1
    state, g = decide(state, acquire(2, spec, cost=100), T0)
    assert g == [] and due_ms(state, T0) == T0 + 869 + 1  # 100 tokens take 1,087 ms at 92 tokens/s, less the burst's 217 ms
    state, _ = decide(state, release(1, cost=400), T0 + 10)  # it used four times its estimate
    assert due_ms(state, T0 + 10) == T0 + 4130 + 1  # 400 tokens: 4,348 ms, less the burst


@settings(max_examples=30, deadline=None)
@given(costs=st.lists(st.tuples(st.integers(100, 300), st.integers(0, 100)), min_size=120, max_size=200),
       tpm=st.sampled_from([30_000, 60_000]))
def test_tokens_charged_in_any_ten_seconds_stay_within_the_budget(costs, tpm):
    """Tokens are paced like requests: the tokens charged (real costs, corrected on release) in any 10 s window stay
    within ``token_bound`` (the paced rate, a 2 % burst and one request larger than the rest)."""
    spec = LimitSpec(tokens_per_minute=tpm)
    state, now, charged = None, T0, []
    for i, (estimate, real_extra) in enumerate(costs):
        state, g = decide(state, acquire(i, spec, cost=estimate), now)
        while state.waiting:
            now = max(now, due_ms(state, now))
            state, more = decide(state, None, now)
            g += more
        for grant in g:
            cost = state.holders[grant.id].cost
            state, _ = decide(state, release(grant.id[1:-4], cost=cost + real_extra), now)  # it used more than estimated
            charged.append((grant.granted_ms, cost + real_extra))
    largest = max(c for _, c in charged)
    for start, _ in charged:
        window = sum(c for t, c in charged if start <= t < start + 10_000)
        assert window <= token_bound(spec, largest=largest), (window, token_bound(spec, largest=largest))
    assert max(sum(c for t, c in charged if s <= t < s + 10_000) for s, _ in charged) > tpm / 6 * 0.85  # the budget was saturated


def test_higher_priority_goes_first_and_the_oldest_among_equals():
    spec = LimitSpec(concurrency=1)
    state, _ = decide(None, acquire("h", spec), T0)
    for i, p in [(1, 1), (2, 5), (3, 3), (4, 5)]:
        state, _ = decide(state, acquire(i, spec, priority=p), T0 + i)
    order = []
    held = "h"
    for t in range(5, 9):
        state, g = decide(state, release(held), T0 + t)
        held = g[0].run_id[1:]
        order.append(g[0].run_id)
    assert order == ["r2", "r4", "r3", "r1"]


def test_the_lowest_priority_does_not_starve_under_a_stream_of_the_highest():
    spec = LimitSpec(concurrency=1)
    state, _ = decide(None, acquire("first", spec), T0)
    state, _ = decide(state, acquire("low", spec, priority=1), T0)
    held, now, n = "first", T0, 0
    while True:  # every second a new priority 5 arrives and the holder finishes
        now += 1000
        n += 1
        state, _ = decide(state, acquire(f"high{n}", spec, priority=5), now)
        state, g = decide(state, release(held), now)
        held = g[0].run_id[1:]
        if held == "low":
            break
    assert now - T0 <= 5 * AGEING_MS + 1000


def test_the_state_round_trips_through_its_json():
    spec = LimitSpec(requests_per_minute=60, concurrency=1)
    state, _ = decide(None, acquire(1, spec, cost=3), T0)
    state, _ = decide(state, acquire(2, spec, priority=5), T0)
    again = KeyState.decoded(state.encoded())
    assert again == state


ops = st.lists(
    st.tuples(st.sampled_from(["acquire", "release", "tick", "pause"]), st.integers(0, 40), st.integers(1, 5), st.integers(0, 1500)),
    min_size=1, max_size=300,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, rpm=st.sampled_from([60, 300, 600, 3000]), concurrency=st.one_of(st.none(), st.integers(1, 6)))
def test_no_window_exceeds_budget_plus_burst_and_concurrency_holds(ops, rpm, concurrency):
    spec = LimitSpec(requests_per_minute=rpm, concurrency=concurrency)
    state: KeyState | None = None
    now = T0
    granted: list[int] = []
    held: set[str] = set()
    for kind, who, priority, dt in ops:
        now += dt
        if kind == "acquire":
            record = acquire(who, spec, priority=priority)
        elif kind == "release":
            record = release(who)
        elif kind == "pause":
            record = release(who, pause_ms=dt)
        else:
            record = None
        if state is not None and record is None:
            due = due_ms(state, now)
            if due is not None and due > now:  # the shell ticks when a key is due: jump there
                now = due
        state, grants = decide(state, record, now)
        if isinstance(record, LimitRelease):
            held.discard(record.id)
        for g in grants:
            assert g.id not in held
            held.add(g.id)
            granted.append(g.granted_ms)
        if concurrency is not None:
            assert len(held) <= concurrency
        assert set(state.holders if state is not None else ()) == held
    most = bound(spec)
    for i, start in enumerate(granted):
        inside = sum(1 for t in granted[i:] if t < start + 10_000)
        assert inside <= most, (inside, most)


def test_the_bound_is_within_five_percent_of_a_budget_of_sixty_or_more_per_ten_seconds():
    spec = LimitSpec(requests_per_minute=360)
    assert bound(spec) <= 60 * 1.05


def test_equals_are_granted_in_the_order_their_runs_asked_not_the_order_their_acquisitions_arrived():
    spec = LimitSpec(concurrency=1)
    state, _ = decide(None, acquire("h", spec), T0)
    late = LimitAcquire(id="r1/a/1", limit="llm", run_id="r1", spec=spec, requested_ms=T0 + 20)
    early = LimitAcquire(id="r2/a/1", limit="llm", run_id="r2", spec=spec, requested_ms=T0 + 10)
    state, _ = decide(state, late, T0 + 30)  # from one coordinator partition
    state, _ = decide(state, early, T0 + 40)  # from another, committed later
    state, g = decide(state, release("h"), T0 + 50)
    assert [x.run_id for x in g] == ["r2"]
    assert g[0].waited_ms == 40  # counted from its run's request


def test_a_requested_time_ahead_of_the_limiters_clock_counts_from_arrival():
    state, _ = decide(None, LimitAcquire(id="r1/a/1", limit="llm", run_id="r1", spec=LimitSpec(concurrency=1), requested_ms=T0 + 60_000), T0)
    assert state.holders["r1/a/1"].granted_ms == T0


def run_acquire(name: str, since_ms: int, priority: int = 3) -> LimitAcquire:
    """A run waiting for its concurrency key (``run:<workflow>``), triggered at ``since_ms``."""
    return LimitAcquire(id=f"run:{name}", limit="run:wf", key="cust-1", run_id=name, priority=priority,
                        spec=LimitSpec(concurrency=1), requested_ms=since_ms)


def test_a_keyed_run_is_not_started_before_every_earlier_trigger_is_decided():
    # b was triggered after a; a's coordinator partition was taken over after a SIGKILL, so b's acquisition arrives
    # first, to a free key: b must wait until a's partition has decided every trigger before b's
    state, g = decide(None, run_acquire("b", T0 + 300), T0 + 400, decided_ms=T0 + 100)
    assert g == [] and state.waiting
    state, g = decide(state, None, T0 + 1_000, decided_ms=T0 + 100)
    assert g == []
    state, g = decide(state, run_acquire("a", T0 + 100), T0 + 2_500, decided_ms=T0 + 100)
    assert g == []  # a's own partition has not reported past it yet
    state, g = decide(state, None, T0 + 2_600, decided_ms=T0 + 2_300)
    assert [x.run_id for x in g] == ["a"]
    state, g = decide(state, LimitRelease(id="run:a", limit="run:wf", key="cust-1"), T0 + 3_000, decided_ms=T0 + 2_700)
    assert [x.run_id for x in g] == ["b"]


def test_a_keyed_run_triggered_before_every_partitions_mark_starts_at_once():
    state, g = decide(None, run_acquire("a", T0 + 100), T0 + 400, decided_ms=T0 + 150)
    assert [x.run_id for x in g] == ["a"]


def test_only_run_concurrency_keys_wait_for_the_trigger_marks():
    spec = LimitSpec(concurrency=1)
    state, g = decide(None, LimitAcquire(id="r1/a/1", limit="llm", run_id="r1", spec=spec, requested_ms=T0 + 300), T0 + 400, decided_ms=T0)
    assert [x.run_id for x in g] == ["r1"]


def test_a_keyed_run_waits_for_the_marks_at_most_order_wait_max():
    state, g = decide(None, run_acquire("b", T0), T0 + 10, decided_ms=0)  # no partition has reported at all
    assert g == [] and due_ms(state, T0 + 10, decided_ms=0) == T0 + ORDER_WAIT_MAX_MS
    state, g = decide(state, None, T0 + ORDER_WAIT_MAX_MS - 1, decided_ms=0)
    assert g == []
    state, g = decide(state, None, T0 + ORDER_WAIT_MAX_MS, decided_ms=0)
    assert [x.run_id for x in g] == ["b"]


def test_without_marks_the_limiter_does_not_gate_keyed_runs():
    state, g = decide(None, run_acquire("b", T0 + 300), T0 + 400)  # decided_ms None: ordering across partitions off
    assert [x.run_id for x in g] == ["b"]
