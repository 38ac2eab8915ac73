"""Diagnostic only: in a coordinator process, time every event-loop callback (asyncio Handle._run); every 2 s write
the count and total of the short ones and, by coroutine, the long ones (> 0.5 ms) with a histogram to $DIAG_OUT."""
import os, sys, time, threading, collections
if os.environ.get("DIAG_OUT") and "coordinator" in " ".join(sys.argv):
    import asyncio.events as ev
    durs = []  # (dur, name)
    orig = ev.Handle._run
    pc = time.perf_counter
    def _run(self):
        t = pc()
        try:
            return orig(self)
        finally:
            d = pc() - t
            if d > 0.0005:
                cb = self._callback
                name = getattr(cb, "__qualname__", None) or repr(cb)
                inner = getattr(cb, "__self__", None)
                coro = getattr(inner, "get_coro", None)
                if coro:
                    try: name = inner.get_coro().__qualname__
                    except Exception: pass
                durs.append((d, name))
            else:
                small[0] += 1; small[1] += d
    small = [0, 0.0]
    ev.Handle._run = _run
    def dump():
        out = os.environ["DIAG_OUT"]
        while True:
            time.sleep(2)
            agg = collections.defaultdict(lambda: [0, 0.0, 0.0])
            for d, n in list(durs):
                a = agg[n]; a[0] += 1; a[1] += d; a[2] = max(a[2], d)
            with open(out + ".tmp", "w") as f:
                f.write(f"small callbacks {small[0]} total {small[1]:.3f}s\n")
                tot = sum(d for d, _ in durs)
                f.write(f"long (>0.5ms) callbacks {len(durs)} total {tot:.3f}s\n")
                for n, (c, s, m) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:25]:
                    f.write(f"{s:8.3f}s {c:7d} max {m*1000:7.2f}ms mean {s/c*1000:6.2f}ms  {n}\n")
                bins = [0.5, 1, 2, 5, 10, 20, 50]
                hist = [sum(1 for d, _ in durs if lo/1000 <= d < hi/1000) for lo, hi in zip(bins, bins[1:] + [1e9])]
                f.write("hist ms " + " ".join(f"[{lo}+]:{h}" for lo, h in zip(bins, hist)) + "\n")
            os.replace(out + ".tmp", out)
    threading.Thread(target=dump, daemon=True).start()
