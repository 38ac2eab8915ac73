"""The coordinator: a transactional consume → decide → produce loop over the run-keyed input.

Per input partition ``p`` (the triggers, coordinator, completions and signals topics, co-partitioned by run_id) there is one
task: the run table of ``p`` (loaded from partition ``p`` of the changelog when the task is assigned) and one
transactional producer whose ``transactional.id`` is ``<group>-<p>``. Each batch a task reads is decided by
``legato.workflows.machine`` and then committed in ONE Kafka transaction holding everything it caused: the requests,
run events, cancellations and child records it produced, the new state of every run it touched (changelog), any
dead letters, and the input offsets (a changelog record of their own, ``CHANGELOG_OFFSETS_KEY``, so they cost no
extra round trip; the consumer group's offsets follow at most once a second). Either all of it becomes visible to
``read_committed`` consumers or none of it.

Killing the process at any moment therefore loses nothing and repeats nothing: the next owner of ``p`` starts a
producer with the same ``transactional.id``, which fences the dead one and aborts its open transaction, then loads
the changelog and resumes from the offsets stored in it. faust's own ``exactly_once`` mode lost runs in our kill tests
and its at-least-once mode acknowledges records fetched before a rebalance (RELIABILITY.md); this loop is why the
coordinator uses aiokafka directly. The activity workers stay on faust.

Modules, one concern each:

- ``loop``: :class:`Coordinator`, the consume loop that hands each partition's records to its task;
- ``partition``: one partition's decisions: decide a batch, store, send and commit it in one transaction;
- ``task``, ``table``: a partition's task and its run table (memory or RocksDB), loaded from the changelog;
- ``batch``: what one transaction holds, and the changelog record of where the inputs resume;
- ``states``: the run states decoded last, reused while the table holds the same bytes;
- ``trace``: ``LEGATO_TRACE_FILE``, the moments of each batch's hops for ``legato bench latency``;
- ``rebalance``: partitions assigned and revoked (tasks parked, reused, opened, reloaded);
- ``timers``: due timers become ``timer.fired`` records;
- ``effects``: the machine's commands become records;
- ``inbox``: input records decoded (a bad one is dead-lettered with the reason), triggers re-keyed by run_id (or decided where they land when keyed by their run_id).
- ``cache``: the result cache topic followed as a table; a request it answers becomes a cached completion.
"""
from legato.streams.coordinator.inbox import run_id_for
from legato.streams.coordinator.loop import Coordinator

__all__ = ["Coordinator", "run_id_for"]
