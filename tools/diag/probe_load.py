"""Ad-hoc load probe: R runs/s of the 20-step chain for S seconds, one coordinator; overhead, hops and CPU per step.
usage: tools/diag/probe_load.py RATE SECS [uncommitted]"""
import sys
import legato.tools.bench as B
from legato.tools.bench_latency import HOPS, _hop_rows, steady_hop_samples
from legato.streams.config import Settings
rate = float(sys.argv[1]); secs = float(sys.argv[2])
if "uncommitted" in sys.argv[3:]:
    orig = B.AIOKafkaConsumer
    def C(*a, **kw):
        kw["isolation_level"] = "read_uncommitted"; return orig(*a, **kw)
    B.AIOKafkaConsumer = C
b = B.Bench(Settings.from_env([], []))
try:
    leg = b.steady(True, int(rate * secs), rate=rate, label="probe", trace=True)
    g = leg["gaps"]
    cpu = {k: f"{v / max(1, leg['steps']) * 1e6:.0f}us/{v / leg['elapsed']:.0%}" for k, v in leg["cpu"].items()}
    print(f"rate {rate*20:.0f} steps/s  p50 {B._ms(g,50):.2f} p99 {B._ms(g,99):.2f} ms  cpu {cpu}  steps {leg['steps']} in {leg['elapsed']:.1f}s", flush=True)
    hops = B.Report("")
    _hop_rows(hops, "hops", steady_hop_samples(leg), None, ("completion sent → next request fetched", "done", "fetched"), HOPS)
    for r in hops.rows:
        print(f"  {r.name}: {r.legato}")
finally:
    b.cleanup()
