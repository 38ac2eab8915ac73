"""The proposal demo's writing steps stream their draft: one progress chunk per word, joined they are the draft the
step returns, and the output is what it was without streaming (the chunks never change a run's result)."""
import pytest

from legato.handlers.examples.proposal import draft_chunks, proposal_quick_draft, proposal_synthesize
from legato.handlers.progress import reporting


@pytest.fixture(autouse=True)
def no_latency(monkeypatch):
    monkeypatch.setenv("LEGATO_DEMO_SCALE", "0")


async def streamed(handler, data):
    chunks = []

    async def report(chunk):
        chunks.append(chunk)

    with reporting(report):
        result = await handler(data)
    return chunks, result


async def test_the_quick_draft_streams_its_proposal_word_by_word():
    chunks, result = await streamed(proposal_quick_draft, {"client": "Acme", "request": "a one-page landing site", "id": "p1"})
    assert "".join(chunks) == result.output["proposal"] == "Quick proposal for Acme: a one-page landing site"
    assert chunks[:2] == ["Quick ", "proposal "] and len(chunks) == 8
    assert (await proposal_quick_draft({"client": "Acme", "request": "a one-page landing site", "id": "p1"})).output == result.output


async def test_the_synthesis_streams_its_draft():
    reviews = {"technical": {"findings": ["a", "b"]}, "business": {"findings": ["c"]}}
    chunks, result = await streamed(proposal_synthesize, {"reviews": reviews, "id": "p2"})
    assert "".join(chunks) == result.output["draft"] == "Proposal draft covering 2 reviews and 3 findings"
    assert len(chunks) == 8


def test_draft_chunks_keep_the_text():
    assert draft_chunks("a  b\nc") == ["a  ", "b\n", "c"]
    assert draft_chunks("") == [""]
