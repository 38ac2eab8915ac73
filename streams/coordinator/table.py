"""One partition's run table: where its runs' states are kept between batches (memory or RocksDB).

The changelog is the truth: a table is rebuilt from it whenever its partition is assigned (``restore``).
"""
from __future__ import annotations

import itertools
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

_FRESH_BYTES = 4 * 1024 * 1024
"""Bytes of states a memory table keeps uncompressed: the most recently written. A run in flight is written at every
step; compressing it at every write and decompressing it at every read cost a quarter of a no-op step's coordinator
CPU (``python -m legato.tools.bench_decide``), so a state is compressed once it is no longer among the last ones
written. A budget in bytes, not a count: with 64 states a partition, 6,000 runs in flight compressed and
decompressed at every step (a third of the coordinator's CPU; BENCHMARKS.md, memory), while 100,000 idle
one-step runs cost each partition at most these 4 MiB more (BENCHMARKS.md, memory)."""


class RunTable:
    """One partition's run table: run_id bytes → state bytes, in memory or on disk (rocksdict)."""

    def __init__(self, path: Path | None):
        self._path = path
        self._fresh: OrderedDict[bytes, bytes] = OrderedDict()  # in memory: the last states written, uncompressed
        self._fresh_bytes = 0
        if path is None:
            self._data: Any = {}
        else:
            from rocksdict import Rdict

            path.parent.mkdir(parents=True, exist_ok=True)  # before destroy: rocksdb cannot lock in a missing dir
            Rdict.destroy(str(path))  # rebuilt from the changelog, which is the truth
            self._data = Rdict(str(path))

    # In memory, each state but the last ``_FRESH_BYTES`` written is kept zlib-compressed (level 1): a one-step
    # run's 667 JSON bytes take 301, for 11 µs per write and 4 µs per read of a state not in the decoded cache
    # (BENCHMARKS.md, memory). A key is in ``_fresh`` or in ``_data``, never in both. RocksDB compresses its own
    # blocks.

    def get(self, key: bytes) -> bytes | None:
        if self._path is not None:
            return self._data.get(key)
        value = self._fresh.get(key)
        if value is not None:
            return value
        value = self._data.get(key)
        return zlib.decompress(value) if value is not None else None

    def put(self, key: bytes, value: bytes) -> None:
        if self._path is not None:
            self._data[key] = value
            return
        self._data.pop(key, None)
        before = self._fresh.pop(key, None)
        if before is not None:
            self._fresh_bytes -= len(before)
        self._fresh[key] = value
        self._fresh_bytes += len(value)
        while self._fresh_bytes > _FRESH_BYTES and len(self._fresh) > 1:
            old, raw = self._fresh.popitem(last=False)
            self._fresh_bytes -= len(raw)
            self._data[old] = zlib.compress(raw, 1)

    def delete(self, key: bytes) -> None:
        if self._path is not None:
            self._data.delete(key)
            return
        before = self._fresh.pop(key, None)
        if before is not None:
            self._fresh_bytes -= len(before)
        self._data.pop(key, None)

    def values(self) -> Iterable[bytes]:
        if self._path is None:
            return itertools.chain(list(self._fresh.values()), (zlib.decompress(v) for v in self._data.values()))
        return self._data.values()

    def count(self) -> int:
        return len(self._data) + len(self._fresh) if self._path is None else sum(1 for _ in self._data.keys())

    def close(self) -> None:
        if self._path is not None:
            self._data.close()
