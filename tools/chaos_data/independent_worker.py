"""An activity worker built on the topic contract alone, with confluent-kafka (librdkafka), for ``legato chaos retries``.

It answers every request of the ``retry_*`` activities at once and never deduplicates (a request read twice is
answered twice), except the first attempt of ``retry_kyc`` for one run in six (input ``n % 6 == 0``), which it never
answers, so that step's timeout and retry run. Completions are keyed by run_id with librdkafka's default partitioner
(CRC32, not Kafka's murmur2), as an independent producer would: the coordinator re-keys those that land elsewhere.

Usage: python independent_worker.py BOOTSTRAP PREFIX
"""
from __future__ import annotations

import json
import signal
import sys

from confluent_kafka import Consumer, Producer

ACTIVITIES = ("retry_intake", "retry_kyc", "retry_score", "retry_limit")


def main() -> None:
    bootstrap, prefix = sys.argv[1], sys.argv[2]
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}-independent", "auto.offset.reset": "earliest",
                         "isolation.level": "read_committed", "enable.auto.commit": True})
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2, "enable.idempotence": True})
    consumer.subscribe([f"{prefix}.requests.{a}" for a in ACTIVITIES])
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    while running:
        for msg in consumer.consume(500, 0.1):
            if msg.error():
                continue
            try:
                req = json.loads(msg.value())
                n = int((req.get("input") or {}).get("n", 0))
                activity, attempt = req["activity"], int(req["attempt"])
            except (ValueError, KeyError, TypeError):
                continue
            if activity == "retry_kyc" and attempt == 1 and n % 6 == 0:
                continue  # never answered: the step's timeout and retry take over
            completion = {"request_id": req["request_id"], "run_id": req["run_id"], "step_id": req["step_id"], "attempt": attempt,
                          "status": "succeeded", "output": {"n": n, "attempt": attempt}}
            producer.produce(f"{prefix}.completions", json.dumps(completion).encode(), key=req["run_id"].encode())
        producer.poll(0)
    producer.flush(10)
    consumer.close()


if __name__ == "__main__":
    main()
