"""User and system CPU of a process's threads over SECS seconds, grouped by thread name (digits folded).
usage: tools/diag/thread_cpu.py PID SECS"""
import os, sys, time, collections, re
pid = sys.argv[1]; secs = float(sys.argv[2])
def snap():
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            s = open(f"/proc/{pid}/task/{t}/stat").read()
            name = s[s.index("(")+1:s.rindex(")")]
            f = s[s.rindex(")")+2:].split()
            out[t] = (name, int(f[11]), int(f[12]))
        except OSError: pass
    return out
a = snap(); time.sleep(secs); b = snap()
agg = collections.defaultdict(lambda: [0, 0])
for t, (n, u, s) in b.items():
    if t in a:
        n2 = re.sub(r"\d+", "N", n)
        agg[n2][0] += u - a[t][1]; agg[n2][1] += s - a[t][2]
tick = os.sysconf("SC_CLK_TCK")
tu = sum(v[0] for v in agg.values()); ts = sum(v[1] for v in agg.values())
print(f"total user {tu/tick/secs:.0%} sys {ts/tick/secs:.0%}")
for n, (u, s) in sorted(agg.items(), key=lambda kv: -sum(kv[1]))[:12]:
    print(f"  {n:30s} user {u/tick/secs:5.0%} sys {s/tick/secs:5.0%}")
