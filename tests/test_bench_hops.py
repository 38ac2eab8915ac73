"""``legato bench overhead``'s hop samples: a step is measured from the previous step's completion to its own request
reaching the worker, and only when the coordinator's trace has the batch that produced the request."""
from legato.tools.bench_latency import steady_hop_samples


def test_a_step_pairs_its_request_with_the_completion_before_it():
    leg = {
        "fetched": {"r/s1/1": 10.0, "r/s2/1": 20.0, "r/s3/1": 30.0, "r/s0/1": 1.0},
        "done": {"r/s0/1": 9.0, "r/s1/1": 19.0},  # the completion of s2 was never seen
        "batches": {"r/s1/1": {"polled": 9.5}, "r/s3/1": {"polled": 29.5}},  # s2's batch is not in the trace
    }
    samples = steady_hop_samples(leg)
    # s0 has no step before it, s2 no traced batch, s3 no completion of s2: only s1 is a sample
    assert samples == [{"polled": 9.5, "done": 9.0, "fetched": 10.0}]
