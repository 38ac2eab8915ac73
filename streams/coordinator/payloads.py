"""The coordinator's payload values: what the state machine's expressions read of references (claim checks).

The machine does no I/O: before a batch of records is decided, the shell fetches every payload that the records and
their runs' stored states refer to (``prefetch``), into a bounded LRU (``CACHE_BYTES`` of JSON); the machine's lookup
(``lookup``) answers from it. A decision that still needs one not here (evicted by a larger batch) raises
``PayloadsMissing`` and the partition is read again (``Partitions.process``): slow, never wrong. Values never
change (a payload's id holds its sha256), so the cache needs no invalidation.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Iterable

import orjson

from legato.topics.payload_refs import REF_PREFIX, PayloadRef, canonical_digest, may_hold_refs, refs_in, substitute
from legato.topics.payloads import KafkaPayloadStore, PayloadError, Payloads, chunk_key
from legato.workflows.claims import Fetched, Unreadable

log = logging.getLogger("legato.coordinator")

CACHE_BYTES = 256 * 1024 * 1024
"""Bytes of payload JSON the coordinator keeps (least recently used first out); a batch's own payloads are kept even
past it, for as long as the batch is decided."""


class PayloadValues:
    """Fetched payload values by id, least recently used first out."""

    def __init__(self, payloads: Payloads, max_bytes: int = CACHE_BYTES):
        self.payloads = payloads
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Fetched | Unreadable] = OrderedDict()
        self._bytes = 0
        self._deleting: set[asyncio.Future] = set()

    def lookup(self, payload_id: str) -> Fetched | Unreadable | None:
        """The machine's lookup: the value of a fetched payload, why it cannot be read, or None (not fetched)."""
        entry = self._entries.get(payload_id)
        if entry is not None:
            self._entries.move_to_end(payload_id)
        return entry

    @staticmethod
    def refs_of(data: bytes | None) -> list[PayloadRef]:
        """The references in a record's or a stored state's bytes (none parsed when the bytes hold no reference)."""
        if not data or not may_hold_refs(data):
            return []
        try:
            return refs_in(orjson.loads(data))
        except (orjson.JSONDecodeError, ValueError):
            return []  # not JSON, or a malformed reference: the decoder dead-letters it, nothing to fetch

    async def prefetch(self, refs: Iterable[PayloadRef]) -> None:
        """Fetch every payload of ``refs`` not yet here, and the payloads their values refer to."""
        pending = [ref for ref in refs if ref.id not in self._entries]
        kept: set[str] = set()
        while pending:
            ref = pending.pop()
            if ref.id in self._entries:
                self._entries.move_to_end(ref.id)
                kept.add(ref.id)
                continue
            try:
                value = await self.payloads.fetch(ref)
            except PayloadError as exc:
                log.warning("payload %s cannot be read: %s", ref.id, exc)
                self._entries[ref.id] = Unreadable(str(exc))
                kept.add(ref.id)
                continue
            self._entries[ref.id] = Fetched(value, canonical_digest(value), ref.size)
            self._bytes += ref.size
            kept.add(ref.id)
            pending.extend(r for r in refs_in(value) if r.id not in self._entries)
        self._evict(kept)

    def _evict(self, kept: set[str]) -> None:
        for payload_id in list(self._entries):
            if self._bytes <= self.max_bytes:
                return
            if payload_id in kept:
                continue
            entry = self._entries.pop(payload_id)
            if isinstance(entry, Fetched):
                self._bytes -= entry.size

    # --- forks ---------------------------------------------------------------------------------

    async def own_fork_seeds(self, sends: list[tuple[str, bytes | None, bytes, int | None]], coordinator_topic: str) -> int:
        """Give each fork seed in ``sends`` its own copies of the payloads it refers to, in place; the copies made.

        A fork starts with outputs of its source run, and those stored by reference have ids ``<source>/…``: the
        source's retention would delete them under the fork. Each is stored again under the fork's run_id (before
        the transaction that sends the seed: a crash in between stores the same ids again, as a payload's id holds
        its sha256), so the fork owns what it reads and its own retention deletes it. A payload that can no longer
        be read is left as the source's reference (reading it fails in the fork as it would in the source)."""
        copied = 0
        for i, (topic, key, value, partition) in enumerate(sends):
            if topic != coordinator_topic or not value or b'"run.fork_accepted"' not in value or not may_hold_refs(value):
                continue
            seed = orjson.loads(value)
            if seed.get("type") != "run.fork_accepted":
                continue
            new_run = seed["run_id"]
            copies: dict[str, dict] = {}
            for ref in refs_in(seed):
                if ref.id.startswith(new_run + "/") or ref.id in copies:
                    continue
                entry = self.lookup(ref.id)
                try:
                    stored = entry.value if isinstance(entry, Fetched) else await self.payloads.fetch(ref)
                except PayloadError as exc:
                    log.warning("fork %s: payload %s cannot be read, the fork keeps the source's reference: %s", new_run, ref.id, exc)
                    continue
                copies[ref.id] = await self.payloads.put(new_run, stored)
            if copies:
                seed = substitute(seed, lambda ref: copies.get(ref.id, ref.wire()))
                sends[i] = (topic, key, orjson.dumps(seed), partition)
                copied += len(copies)
        return copied

    # --- retention ----------------------------------------------------------------------------

    def forget(self, run_id: str, stored: bytes, unused: Iterable[dict] = ()) -> list[tuple[str, bytes, None, int]]:
        """A run's retention ended: the tombstones of the Kafka-stored payloads it owns (ids ``<run_id>/…``: those its
        stored document refers to, and ``unused``, its ``RunState.unused_payloads``), to send in the transaction that
        forgets the run; payloads of another store are deleted now (a crash before the run's tombstone is committed
        leaves it to be forgotten again, its payloads already gone)."""
        owned = [ref for ref in self.refs_of(stored) if ref.id.startswith(run_id + "/")]
        seen = {ref.id for ref in owned}
        for entry in unused:
            if entry.get("id", "").startswith(run_id + "/") and entry["id"] not in seen:
                seen.add(entry["id"])
                owned.append(PayloadRef.model_validate({"$ref": REF_PREFIX + entry["id"], **{k: v for k, v in entry.items() if k != "id"}}))
        for ref in owned:
            entry = self._entries.pop(ref.id, None)
            if isinstance(entry, Fetched):
                self._bytes -= entry.size
        store = self.payloads.store
        if isinstance(store, KafkaPayloadStore):
            return [(store.topic, chunk_key(ref.id, n), None, ref.partition) for ref in owned if ref.partition is not None
                    for n in range(ref.chunks or 1)]
        for ref in owned:
            task = asyncio.ensure_future(self.payloads.delete(ref))
            self._deleting.add(task)
            task.add_done_callback(self._deleting.discard)
        return []

