"""``TimerBounds``: whether a run has a timer due by a time, answered from a lower bound of its earliest timer, always
as a full read of its timers would answer, whatever the order of timers started, cleared and fired."""
from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from legato.streams.coordinator.partition import TimerBounds

MANY = TimerBounds.MANY

ops = st.lists(st.one_of(
    st.tuples(st.just("start"), st.integers(0, 10_000)),
    st.tuples(st.just("clear"), st.integers(0, 200)),
    st.tuples(st.just("due"), st.integers(0, 10_000)),
), max_size=300)


@settings(max_examples=300, deadline=None)
@given(initial=st.lists(st.integers(0, 10_000), min_size=0, max_size=3 * MANY), ops=ops)
def test_the_bound_answers_as_a_full_read_would(initial, ops):
    state = SimpleNamespace(run_id="r", timers={})
    bounds = TimerBounds()
    n = 0
    for due_ms in initial:  # timers the stored state already had: no bound is kept for it yet
        state.timers[f"t{n}"] = SimpleNamespace(due_ms=due_ms)
        n += 1
    for op, arg in ops:
        if op == "start":  # as the machine does: into the state, and a StartTimer command the shell passes on
            state.timers[f"t{n}"] = SimpleNamespace(due_ms=arg)
            bounds.started("r", arg)
            n += 1
        elif op == "clear" and state.timers:
            state.timers.pop(sorted(state.timers)[arg % len(state.timers)])  # cleared or fired: no command
        elif op == "due":
            assert bounds.due(state, arg) == any(t.due_ms <= arg for t in state.timers.values())


def test_many_timers_far_off_are_not_read_again_at_each_event():
    reads = []

    class Timers(dict):
        def values(self):
            reads.append(1)
            return super().values()

    state = SimpleNamespace(run_id="r", timers=Timers({f"s{i}:timeout:1": SimpleNamespace(due_ms=600_000 + i) for i in range(10_000)}))
    bounds = TimerBounds()
    assert bounds.due(state, 1_000) is False
    for now in range(1_000, 2_000, 10):
        assert bounds.due(state, now) is False
    assert len(reads) == 1  # one full read, then the bound answers
    bounds.started("r", 1_500)  # a sleep due soon
    state.timers["sleep"] = SimpleNamespace(due_ms=1_500)
    assert bounds.due(state, 1_600) is True
    bounds.forget("r")
    del state.timers["sleep"]
    assert bounds.due(state, 1_600) is False
