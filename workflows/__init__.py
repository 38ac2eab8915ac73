"""The workflow language and the pure state machine (no Kafka, no clock, no I/O)."""
