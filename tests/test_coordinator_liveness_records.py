"""The coordinator's reading of ``activity.started`` and ``activity.heartbeat`` records on the completions topic: the
inbox decodes them by their ``type``, and the answer fence never takes one for a worker's answer."""
from __future__ import annotations

import orjson
import pytest

from legato.streams.coordinator.fence import answered
from legato.streams.coordinator.inbox import Inbox
from legato.topics import codec
from legato.topics.codec import DecodeError
from legato.topics.models import ActivityCompleted, ActivityHeartbeat, ActivityStarted
from legato.topics.names import Topics

TOPICS = Topics()
BASE = {"request_id": "r1/a/1", "run_id": "r1", "step_id": "a", "attempt": 1}


def test_the_inbox_decodes_each_completions_record_by_its_type():
    inbox = Inbox(TOPICS, 1)
    done = inbox.decode(TOPICS.completions, orjson.dumps({**BASE, "status": "succeeded", "output": 1}))
    begun = inbox.decode(TOPICS.completions, codec.dumps(ActivityStarted(**BASE, started_ms=5)))
    alive = inbox.decode(TOPICS.completions, codec.dumps(ActivityHeartbeat(**BASE, heartbeat_ms=6)))
    assert (type(done), type(begun), type(alive)) == (ActivityCompleted, ActivityStarted, ActivityHeartbeat)
    assert (begun.started_ms, alive.heartbeat_ms) == (5, 6)


def test_a_started_record_without_its_time_is_refused_with_the_reason():
    with pytest.raises(DecodeError, match="ActivityStarted: started_ms"):
        Inbox(TOPICS, 1).decode(TOPICS.completions, orjson.dumps({**BASE, "type": "activity.started"}))


def test_the_answer_fence_counts_completions_only():
    # a completion answers its request, succeeded or failed
    assert answered(orjson.dumps({**BASE, "status": "succeeded"})) == "r1/a/1"
    assert answered(orjson.dumps({**BASE, "status": "failed", "error": {"type": "Boom"}})) == "r1/a/1"
    # a handler that started or is alive has not answered: its request's timeout must not wait for it
    assert answered(codec.dumps(ActivityStarted(**BASE, started_ms=5))) is None
    assert answered(codec.dumps(ActivityHeartbeat(**BASE, heartbeat_ms=6))) is None
    # nor is anything unreadable an answer
    assert answered(b"not json") is None and answered(b"[1]") is None and answered(orjson.dumps({"request_id": 3})) is None
