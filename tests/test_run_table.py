"""The coordinator's in-memory run table: the last states written stay uncompressed within a byte budget, the
others are compressed, and every state reads back as written whichever side it is on."""
from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from legato.streams.coordinator import table as table_module
from legato.streams.coordinator.table import RunTable


def test_states_past_the_budget_are_compressed_oldest_first_and_read_back_as_written(monkeypatch) -> None:
    monkeypatch.setattr(table_module, "_FRESH_BYTES", 10_000)
    table = RunTable(None)
    states = {f"run-{i}".encode(): (b'{"i":%d,"pad":"' % i) + os.urandom(500).hex().encode() + b'"}' for i in range(100)}
    for key, value in states.items():
        table.put(key, value)
    assert table._fresh_bytes <= 10_000 and table._fresh_bytes == sum(map(len, table._fresh.values()))
    assert list(table._fresh)[-1] == b"run-99" and b"run-0" in table._data  # the newest stay fresh, the oldest compressed
    assert set(table._fresh).isdisjoint(table._data) and table.count() == 100
    assert all(table.get(k) == v for k, v in states.items())
    table.put(b"run-0", b'{"i":0}')  # written again: fresh, no longer compressed
    assert b"run-0" in table._fresh and b"run-0" not in table._data and table.get(b"run-0") == b'{"i":0}'
    table.delete(b"run-99")
    assert table.get(b"run-99") is None and table._fresh_bytes == sum(map(len, table._fresh.values()))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c", b"d"]), st.one_of(st.none(), st.binary(min_size=1, max_size=3000))), max_size=60))
def test_any_sequence_of_writes_and_deletes_reads_like_a_dict(ops) -> None:
    table_module._FRESH_BYTES, budget = 4000, table_module._FRESH_BYTES
    try:
        table, model = RunTable(None), {}
        for key, value in ops:
            if value is None:
                table.delete(key)
                model.pop(key, None)
            else:
                table.put(key, value)
                model[key] = value
            assert table._fresh_bytes == sum(map(len, table._fresh.values()))
        assert {k: table.get(k) for k in (b"a", b"b", b"c", b"d")} == {k: model.get(k) for k in (b"a", b"b", b"c", b"d")}
        assert sorted(table.values()) == sorted(model.values())
    finally:
        table_module._FRESH_BYTES = budget
