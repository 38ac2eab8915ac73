"""``streams.kafka_io.transaction``: the begin / commit / abort pattern of every transactional turn (the coordinator's
batches, its idle offset flush, the limiter's shards)."""
from __future__ import annotations

import pytest

from legato.streams.kafka_io import transaction


class Producer:
    def __init__(self, commit_fails: bool = False, abort_fails: bool = False):
        self.calls: list[str] = []
        self.commit_fails, self.abort_fails = commit_fails, abort_fails

    async def begin_transaction(self):
        self.calls.append("begin")

    async def commit_transaction(self):
        self.calls.append("commit")
        if self.commit_fails:
            raise RuntimeError("fenced")

    async def abort_transaction(self):
        self.calls.append("abort")
        if self.abort_fails:
            raise RuntimeError("fatal")


async def test_a_block_that_ends_commits():
    p = Producer()
    async with transaction(p):
        p.calls.append("send")
    assert p.calls == ["begin", "send", "commit"]


async def test_a_block_that_raises_aborts_and_the_error_goes_on():
    p = Producer()
    with pytest.raises(ValueError):
        async with transaction(p):
            raise ValueError("a delivery failed")
    assert p.calls == ["begin", "abort"]


async def test_a_commit_that_fails_is_aborted_and_raised():
    p = Producer(commit_fails=True)
    with pytest.raises(RuntimeError, match="fenced"):
        async with transaction(p):
            pass
    assert p.calls == ["begin", "commit", "abort"]


async def test_an_abort_that_fails_leaves_the_first_error():
    p = Producer(abort_fails=True)
    with pytest.raises(ValueError):
        async with transaction(p):
            raise ValueError("a delivery failed")
    assert p.calls == ["begin", "abort"]
