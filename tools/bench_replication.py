"""``legato bench replication``: what replication factor 3 costs against factor 1, on one 3-broker cluster, in one run.

The cluster is a :class:`~legato.tools.kafka_cluster.LocalCluster` whose first broker listens on the bootstrap's port
(``LEGATO_BOOTSTRAP=localhost:19310`` → brokers on 19310, 19312, 19314): a cluster of three already running there is
used and left running, else one is started on empty data and stopped at the end. A single broker answering there is
an error (replication needs the three).

For each factor (1, then 3, ``min.insync.replicas`` = factor − 1, at least 1) on fresh topics of that factor:

- throughput: ``--runs`` runs of 20 no-op steps started at once, Legato and the raw pipe (``bench.raw_pipe``);
- per-step overhead p50 / p95: the same pipes at 20 % of the factor-1 Legato throughput (the same load for both
  factors), completion produced → next request received by the measuring worker.

The measuring worker, the load and the raw pipe produce with ``acks=all`` like Legato's own producers, so the raw
pipe is what Kafka itself costs at each factor: the baseline the ratios are taken against.
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

from legato.streams.config import Settings
from legato.tools import kafka_local
from legato.tools.bench import Bench, Report, Row, _ms
from legato.tools.kafka_cluster import LocalCluster, local_cluster

FACTORS = (1, 3)
LOAD_SHARE = 0.2  # a load the machine holds steadily: at half of the throughput the queues, not replication, dominate


def _cluster(bootstrap: str) -> tuple[LocalCluster, bool]:
    """The 3-broker cluster at ``bootstrap``'s port and whether this run started it (and stops it)."""
    cluster = local_cluster(bootstrap, 3)
    assert cluster is not None
    if len(cluster.running()) == cluster.size:
        return cluster, False
    if kafka_local.broker_alive(bootstrap):
        raise SystemExit(f"legato bench replication: a broker that is not a local 3-broker cluster answers at {bootstrap}; "
                         "stop it (legato kafka stop) or point LEGATO_BOOTSTRAP at a free port")
    cluster = LocalCluster(cluster.base_port, Path(tempfile.mkdtemp(prefix="legato-bench-cluster-")), 3, heap="-Xmx384m")
    print(cluster.start(fresh=True), file=sys.stderr)
    return cluster, True


def _measure(settings: Settings, factor: int, runs: int, rate: float | None) -> dict[str, Any]:
    """Throughput of both pipes at ``factor``; with ``rate`` (runs/s) also their per-step overhead at that load."""
    s = dataclasses.replace(settings, replication_factor=factor, min_insync_replicas=max(1, factor - 1))
    b = Bench(s, acks="all")
    try:
        out: dict[str, Any] = {}
        for legato, name in ((False, "raw"), (True, "legato")):
            r = b.steady(legato, runs, label=f"{name} throughput, factor {factor}")
            out[f"{name}_rate"] = r["steps"] / r["elapsed"]
            out[f"{name}_runs"] = r
        if rate is None:  # factor 1 goes first: its Legato throughput sets the load of both overhead measurements
            rate = LOAD_SHARE * out["legato_rate"] / 20
        n = max(5, min(runs, int(rate * 20)))
        for legato, name in ((False, "raw"), (True, "legato")):
            r = b.steady(legato, n, rate=rate, label=f"{name} overhead, factor {factor}")
            out[f"{name}_gaps"] = r["gaps"]
        out["rate"] = rate
        return out
    finally:
        b.cleanup()


def bench_replication(settings: Settings, runs: int) -> Report:
    cluster, own = _cluster(settings.bootstrap)
    try:
        settings = dataclasses.replace(settings, bootstrap=cluster.bootstrap)
        first = _measure(settings, FACTORS[0], runs, None)
        second = _measure(settings, FACTORS[1], runs, first["rate"])
    finally:
        if own:
            cluster.cleanup()
    by = dict(zip(FACTORS, (first, second)))
    report = Report(f"legato bench replication --runs {runs}")
    for f, m in by.items():
        report.rows.append(Row(f"throughput, factor {f} (steps/s)", f"{m['legato_rate']:.0f}", f"{m['raw_rate']:.0f}",
                               f"{m['legato_rate'] / m['raw_rate']:.2f}", "report", "-"))
    lo, hi = by[FACTORS[0]], by[FACTORS[1]]
    report.rows.append(Row(f"throughput, factor {FACTORS[1]} / factor {FACTORS[0]}", f"{hi['legato_rate'] / lo['legato_rate']:.2f}",
                           f"{hi['raw_rate'] / lo['raw_rate']:.2f}", "-", "report", "-"))
    steps_s = first["rate"] * 20
    for q in (50, 95):
        for f, m in by.items():
            lv, rv = _ms(m["legato_gaps"], q), _ms(m["raw_gaps"], q)
            report.rows.append(Row(f"overhead p{q} at {steps_s:.0f} steps/s, factor {f}", f"{lv:.2f} ms", f"{rv:.2f} ms",
                                   f"{lv / rv:.2f}" if rv else "-", "report", "-"))
        ld = _ms(hi["legato_gaps"], q) - _ms(lo["legato_gaps"], q)
        rd = _ms(hi["raw_gaps"], q) - _ms(lo["raw_gaps"], q)
        report.rows.append(Row(f"overhead p{q}: factor {FACTORS[1]} − factor {FACTORS[0]}", f"{ld:+.2f} ms", f"{rd:+.2f} ms", "-", "report", "-"))
    report.notes.append(f"One local 3-broker KRaft cluster ({'started by this run' if own else 'already running'}; brokers, coordinator, "
                        "measuring worker and load share the machine's cores). Factor 1: min.insync.replicas 1; factor 3: min.insync.replicas 2.")
    report.notes.append(f"Throughput: {runs} runs × 20 no-op steps started at once. Overhead: completion produced → next request received, "
                        f"at {LOAD_SHARE:.0%} of the factor-{FACTORS[0]} Legato throughput ({first['rate']:.1f} runs/s) for both factors.")
    report.notes.append("Raw pipe: a stateless consumer turning each completion into the next request; it, the measuring worker and the "
                        "load produce with acks=all like Legato (the coordinator's transactions, the workers' acks=all).")
    return report
