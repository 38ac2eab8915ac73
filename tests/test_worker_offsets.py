"""RequestOffsets: what a worker may commit on each request partition."""
from legato.streams.worker_offsets import RequestOffsets


def test_commits_up_to_the_oldest_request_in_flight_across_gaps():
    offsets = RequestOffsets()
    a = offsets.received("p0", 10)
    b = offsets.received("p0", 12)  # 11: a transaction marker
    c = offsets.received("p0", 20)  # 13-19: an aborted transaction and its marker
    offsets.answered(b)
    offsets.answered(c)
    assert offsets.committable() == {"p0": 10}
    offsets.answered(a)
    assert offsets.committable() == {"p0": 21}


def test_nothing_new_to_commit_after_a_commit():
    offsets = RequestOffsets()
    offsets.answered(offsets.received("p0", 5))
    offsets.committed({"p0": 6})
    assert offsets.committable() == {}
    offsets.received("p0", 8)
    assert offsets.committable() == {"p0": 8}  # 8 in flight, 7 a transaction marker: past the marker, not past 8


def test_an_answer_from_before_a_revocation_is_ignored():
    offsets = RequestOffsets()
    old = offsets.received("p0", 3)
    offsets.revoked({"p0"})
    assert offsets.committable() == {}
    again = offsets.received("p0", 3)  # the partition came back: read again from the committed offset
    offsets.answered(old)
    assert offsets.committable() == {"p0": 3}
    offsets.answered(again)
    assert offsets.committable() == {"p0": 4}
    assert offsets.in_flight("p0") == 0
