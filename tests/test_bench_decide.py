"""``python -m legato.tools.bench_decide`` drives the coordinator's real decision path; its runs must end as the
workflows say, or its figures time something else."""
from __future__ import annotations

from legato.tools import bench_decide


def test_the_sequential_chain_runs_to_its_terminal_event_and_times_every_completion() -> None:
    shell = bench_decide.Shell()
    timings: list[float] = []
    bench_decide.run_once(shell, timings)
    assert len(timings) == bench_decide.STEPS and all(t > 0 for t in timings)


def test_a_fan_out_answers_every_item_and_joins() -> None:
    shell = bench_decide.Shell(source=bench_decide.FANOUT_YAML)
    per_branch = bench_decide.fanout_once(shell, 600)  # more than a map keeps in flight (256): items start as others end
    assert per_branch > 0
    stored = [t.store.count() for t in shell.tasks]
    assert sum(stored) == 1  # the one run, finished
