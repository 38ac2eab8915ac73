"""Diagnostic only: with $DIAG_OUT set, count the Kafka requests this process sends by type (aiokafka
AIOKafkaConnection.send) and write them to $DIAG_OUT.<role>.<pid> every 2 s."""
import os, sys, time, threading, collections
if os.environ.get("DIAG_OUT"):
    counts = collections.Counter()
    def patch():
        from aiokafka.conn import AIOKafkaConnection
        orig = AIOKafkaConnection.send
        def send(self, request, expect_response=True):
            counts[type(request).__name__] += 1
            return orig(self, request, expect_response)
        AIOKafkaConnection.send = send
    try:
        patch()
    except Exception as e:
        print("diag patch failed", e, file=sys.stderr)
    role = "coordinator" if "coordinator" in " ".join(sys.argv) else "bench"
    t0 = time.time()
    def dump():
        out = f"{os.environ['DIAG_OUT']}.{role}.{os.getpid()}"
        while True:
            time.sleep(2)
            with open(out, "w") as f:
                f.write(f"{time.time()-t0:.1f}s " + " ".join(f"{k}={v}" for k, v in counts.most_common()) + "\n")
    threading.Thread(target=dump, daemon=True).start()
