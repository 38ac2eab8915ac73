"""``legato chaos scale``'s judgement: stalls per partition, and duplicate executions tied to the steps they were in flight at."""
from __future__ import annotations

import orjson

from legato.tools.chaos_scale import duplicates_by_step, max_gap
from legato.tools.harness import Rec


def rec(partition: int, t: float, value: dict) -> Rec:
    return Rec("t", partition, 0, int(t * 1000), None, orjson.dumps(value), t)


def test_the_stall_is_the_longest_gap_of_one_partition_counted_from_the_start():
    records = [rec(0, 1.0, {}), rec(0, 3.5, {}), rec(1, 2.0, {}), rec(1, 2.2, {}), rec(0, 20.0, {})]
    assert max_gap(records, 0.5, 10.0) == 2.5  # partition 0: 1.0 -> 3.5; the record at 20 s is outside the window
    assert max_gap(records, 11.0, 12.0) is None


def test_a_duplicate_counts_as_in_flight_only_when_sent_before_a_worker_step_settled_and_first_answered_after_it_began():
    requests = [rec(0, 10.0, {"request_id": "a"}), rec(0, 30.0, {"request_id": "b"}), rec(0, 5.0, {"request_id": "c"})]
    completions = [rec(0, 12.0, {"request_id": "a"}), rec(0, 14.0, {"request_id": "a"}),  # in flight at the step
                   rec(0, 31.0, {"request_id": "b"}), rec(0, 32.0, {"request_id": "b"}),  # long after it
                   rec(0, 6.0, {"request_id": "c"})]  # answered once
    out = duplicates_by_step(requests, completions, {"worker 1 -> 2": (11.0, 15.0)})
    assert out["duplicates_in_flight"] == 1 and out["duplicates_by_step"] == {"worker 1 -> 2": 1}
    assert out["duplicates_unexplained"] == 1 and out["unexplained_examples"][0]["request_id"] == "b"


def test_a_request_reissued_by_a_coordinator_taking_over_counts_at_the_coordinator_step():
    requests = [rec(0, 21.7, {"request_id": "a"}), rec(0, 26.9, {"request_id": "a"})]  # re-issued by the new owner
    completions = [rec(0, 22.2, {"request_id": "a"}), rec(0, 27.3, {"request_id": "a"})]
    out = duplicates_by_step(requests, completions, {"coordinator 2 -> 1": (22.1, 26.0), "worker 3 -> 2": (26.0, 31.0)})
    assert out["duplicates_by_step"] == {"coordinator 2 -> 1": 1} and out["duplicates_after_reissue"] == 1
    assert duplicates_by_step(requests, completions, {"worker 3 -> 2": (26.0, 31.0)})["duplicates_unexplained"] == 1
