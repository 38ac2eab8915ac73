"""Trigger marks (streams/coordinator/marks.py): how far a partition has decided its triggers, from what it polled,
committed and forwarded; never backwards."""
from __future__ import annotations

import orjson

from legato.streams.coordinator.marks import FORWARD_HOLD_MS, SLACK_MS, Undecided, caught_up_ms, forwarded_triggers

T0 = 1_800_000_000_000


def test_a_polled_trigger_holds_the_mark_at_its_time_until_committed():
    u = Undecided()
    u.polled_trigger(5, T0 + 100)
    u.polled_trigger(6, T0 + 300)
    assert u.compute(T0 + 1_000, T0 + 1_000) == T0 + 100
    u.committed(6, None, [], T0 + 1_100)  # offset 5 decided, 6 not yet
    assert u.compute(T0 + 1_200, T0 + 1_200) == T0 + 300
    u.committed(7, None, [], T0 + 1_300)
    assert u.compute(T0 + 1_400, T0 + 1_400) == T0 + 1_400 - SLACK_MS


def test_no_news_keeps_the_mark_and_it_never_goes_back():
    u = Undecided()
    assert u.compute(None, T0) == 0  # never caught up: nothing known
    assert u.compute(T0 + 1_000, T0 + 1_000) == T0 + 1_000 - SLACK_MS
    assert u.compute(None, T0 + 5_000) == T0 + 1_000 - SLACK_MS  # fetching paused or behind
    u.polled_trigger(9, T0 + 10)  # a producer's clock behind: its trigger cannot move the mark back
    assert u.compute(T0 + 6_000, T0 + 6_000) == T0 + 1_000 - SLACK_MS


def test_a_forwarded_trigger_counts_where_it_is_decided_and_holds_the_forwarder_meanwhile():
    accepted = orjson.dumps({"type": "run.accepted", "run_id": "r1", "workflow": "keyed", "triggered_ms": T0 + 50})
    other = orjson.dumps({"type": "run.accepted", "run_id": "r2", "workflow": "plain", "triggered_ms": T0 + 60})
    sends = [("p.coordinator", b"r1", accepted, None), ("p.coordinator", b"r2", other, None), ("p.runs", b"r1", b"{}", None)]
    forwarded = forwarded_triggers(sends, "p.coordinator", lambda wf: wf == "keyed")
    assert forwarded == [T0 + 50]
    sender = Undecided()
    sender.committed(None, None, forwarded, T0 + 2_000)
    assert sender.compute(T0 + 2_100, T0 + 2_100) == T0 + 50
    assert sender.compute(T0 + 2_000 + FORWARD_HOLD_MS, T0 + 2_000 + FORWARD_HOLD_MS) == T0 + 2_000 + FORWARD_HOLD_MS - SLACK_MS
    receiver = Undecided()
    receiver.polled_coordinator(40, accepted, T0 + 2_000)
    receiver.polled_coordinator(41, b'{"type":"limit.granted"}', T0 + 2_000)
    assert receiver.compute(T0 + 2_100, T0 + 2_100) == T0 + 50
    receiver.committed(None, 41, [], T0 + 2_200)
    assert receiver.compute(T0 + 2_300, T0 + 2_300) == T0 + 2_300 - SLACK_MS


class FakeConsumer:
    def __init__(self, state):
        self.state = state  # tp → (position, last stable offset, last poll ms)

    def last_stable_offset(self, tp):
        return self.state[tp][1]

    def last_poll_timestamp(self, tp):
        return self.state[tp][2]


def test_caught_up_only_when_every_record_the_last_fetch_found_was_handed_out(monkeypatch):
    from legato.streams.coordinator import marks

    monkeypatch.setattr(marks.kafka_io, "fetched_position", lambda consumer, tp: consumer.state[tp][0])
    assert caught_up_ms(FakeConsumer({"t": (10, 10, T0 + 5), "c": (3, 3, T0 + 9)}), ["t", "c"]) == T0 + 5
    assert caught_up_ms(FakeConsumer({"t": (9, 10, T0 + 5), "c": (3, 3, T0 + 9)}), ["t", "c"]) is None
    assert caught_up_ms(FakeConsumer({"t": (None, 10, T0 + 5)}), ["t"]) is None
    assert caught_up_ms(FakeConsumer({"t": (0, -1, T0 + 5)}), ["t"]) is None
