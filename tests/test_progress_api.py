"""The handler's progress API without a broker: ``await progress(chunk)`` reaches the worker's reporter of the
request being run, numbered from 0, and does nothing outside a worker."""
import asyncio

import orjson

from legato.handlers import progress
from legato.handlers.progress import reporting
from legato.streams.worker import _Progress
from legato.topics.models import ActivityRequested


async def handler(data):
    for i in range(data["n"]):
        await progress({"i": i})
    return "done"


async def test_progress_outside_a_worker_does_nothing():
    assert await handler({"n": 2}) == "done"


async def test_chunks_reach_the_reporter_of_the_request_in_the_handlers_task():
    got = []

    async def report(chunk):
        got.append(chunk)

    with reporting(report):
        assert await asyncio.wait_for(handler({"n": 3}), 5) == "done"  # the worker runs handlers through wait_for
    assert got == [{"i": 0}, {"i": 1}, {"i": 2}]
    await handler({"n": 1})
    assert len(got) == 3  # reset after the block


class _Topic:
    def __init__(self):
        self.sent = []

    async def send(self, key, value):
        self.sent.append((key, orjson.loads(value)))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


async def test_the_worker_numbers_each_requests_chunks_from_zero_and_keys_them_by_run():
    topic = _Topic()
    request = ActivityRequested(request_id="r1/write/1", run_id="r1", step_id="write", activity="llm", attempt=1, input={})
    reporter = _Progress(topic, request, "llm")
    with reporting(reporter):
        await handler({"n": 2})
    await reporter.delivered()
    assert topic.sent == [
        (b"r1", {"run_id": "r1", "step_id": "write", "request_id": "r1/write/1", "seq": 0, "chunk": {"i": 0}}),
        (b"r1", {"run_id": "r1", "step_id": "write", "request_id": "r1/write/1", "seq": 1, "chunk": {"i": 1}}),
    ]


async def test_chunks_stored_by_reference_are_listed_on_the_completion(tmp_path):
    """A chunk over the inline limit is stored under the run's id; the completion lists each once
    (``progress_payloads``), so the run's retention deletes them; small chunks list nothing."""
    from legato.topics.models import ActivityCompleted
    from legato.topics.payloads import FilePayloadStore, Payloads

    payloads = Payloads(FilePayloadStore(tmp_path), inline_max=100)
    topic = _Topic()
    request = ActivityRequested(request_id="r1/write/1", run_id="r1", step_id="write", activity="llm", attempt=1, input={})
    reporter = _Progress(topic, request, "llm", payloads=payloads)
    await reporter({"i": 0})
    await reporter({"text": "a" * 500})
    await reporter({"text": "a" * 500})  # the same value again: the same id, listed once
    await reporter({"text": "b" * 500})
    completion = ActivityCompleted(request_id="r1/write/1", run_id="r1", step_id="write", attempt=1, status="succeeded", output="done")
    listed = reporter.listed_on(completion).progress_payloads
    ids = [p.id for p in listed]
    assert len(ids) == 2 and len(set(ids)) == 2 and all(i.startswith("r1/") for i in ids), ids
    assert sorted(ids) == sorted(FilePayloadStore(tmp_path).ids())
    assert topic.sent[0][1]["chunk"] == {"i": 0} and "legato-payload:" in orjson.dumps(topic.sent[1][1]["chunk"]).decode()
    quiet = _Progress(_Topic(), request, "llm", payloads=payloads)
    await quiet({"i": 0})
    assert quiet.listed_on(completion) is completion
