"""Demo handlers for the proposal-generation example and the AI-control patterns (docs/patterns/).

They simulate model calls: a latency, a confidence and a token cost, all drawn from a random generator seeded
from the request's input (and the activity name), so the same request gives the same run every time.
Latencies are scaled by LEGATO_DEMO_SCALE like handlers/demo.py. The writing steps (``proposal_quick_draft``,
``proposal_synthesize``) stream their draft word by word while the simulated call lasts, like an LLM streaming
tokens: ``await progress(chunk)`` per chunk (docs/signals-and-progress.md); the draft they return is the chunks joined.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
from typing import Any

import orjson

from legato.handlers import progress
from legato.handlers.registry import ActivityError, Result, activity

# usd per 1000 tokens (in, out) of the simulated models
MODELS: dict[str, tuple[float, float]] = {
    "small-llm": (0.00015, 0.0006),
    "medium-llm": (0.0008, 0.0024),
    "large-llm": (0.003, 0.015),
}


def _scale() -> float:
    return float(os.environ.get("LEGATO_DEMO_SCALE", "1.0"))


def rng(name: str, data: Any) -> random.Random:
    """A generator seeded from the activity name and the canonical JSON of its input: repeatable runs."""
    canonical = orjson.dumps(data, option=orjson.OPT_SORT_KEYS, default=str)
    seed = int.from_bytes(hashlib.sha256(name.encode() + b"\0" + canonical).digest()[:8], "big")
    return random.Random(seed)


async def model_call(r: random.Random, model: str, base_seconds: float, tokens_in: int, tokens_out: int,
                     stream: str | None = None) -> dict[str, Any]:
    """Sleep like a model call of ``model`` and return its cost record. With ``stream``, the text comes out as
    progress chunks (a word each, with its trailing space) spread over the call's duration."""
    seconds = base_seconds * r.uniform(0.7, 1.3) * _scale()
    if stream is None:
        await asyncio.sleep(seconds)
    else:
        chunks = draft_chunks(stream)
        for chunk in chunks:
            await asyncio.sleep(seconds / len(chunks))
            await progress(chunk)
    tin = int(tokens_in * r.uniform(0.8, 1.2))
    tout = int(tokens_out * r.uniform(0.8, 1.2))
    usd_in, usd_out = MODELS.get(model, MODELS["medium-llm"])
    return {"usd": round(tin / 1000 * usd_in + tout / 1000 * usd_out, 6), "tokens_in": tin, "tokens_out": tout, "model": model}


def draft_chunks(text: str) -> list[str]:
    """The chunks a draft is streamed in: its words with their trailing whitespace (joined, they are the text)."""
    return re.findall(r"\S+\s*", text) or [text]


def _words(value: Any) -> int:
    return len(str(value or "").split())


# --- complex proposal generation (workflows/examples/proposal.yaml) ---------------------------


@activity("proposal_assess")
async def proposal_assess(data: dict[str, Any]) -> Result:
    """Initial assessment: how complex is the request? Few requirements and a short text → simple."""
    r = rng("proposal_assess", data)
    requirements = list(data.get("requirements") or [])
    points = len(requirements) + _words(data.get("request")) / 25 + r.uniform(-0.5, 0.5)
    complexity = "simple" if points < 3 else "complex"
    confidence = round(min(0.99, 0.55 + abs(points - 3) * 0.12 + r.uniform(0, 0.1)), 3)
    cost = await model_call(r, "small-llm", 0.15, 400 + 40 * len(requirements), 40)
    return Result({"complexity": complexity, "points": round(points, 2), "requirements": len(requirements)}, confidence=confidence, cost=cost)


@activity("proposal_quick_draft")
async def proposal_quick_draft(data: dict[str, Any]) -> Result:
    """The fast path: one call to a small model."""
    r = rng("proposal_quick_draft", data)
    proposal = f"Quick proposal for {data.get('client', 'the client')}: {data.get('request', '')}"
    cost = await model_call(r, "small-llm", 0.4, 700, 500, stream=proposal)
    score = round(r.uniform(0.78, 0.92), 3)
    return Result({"proposal": proposal, "score": score}, confidence=score, cost=cost)


@activity("proposal_review")
async def proposal_review(data: dict[str, Any]) -> Result:
    """One expert review (``aspect``: technical | business | compliance) by a large model."""
    aspect = str(data.get("aspect", "technical"))
    r = rng("proposal_review", data)
    cost = await model_call(r, "large-llm", {"technical": 0.9, "business": 0.7, "compliance": 1.1}.get(aspect, 0.8), 1500, 600)
    findings = [f"{aspect} finding {i + 1}" for i in range(r.randint(1, 4))]
    risk = round(r.uniform(0.05, 0.6), 2)
    return Result({"aspect": aspect, "findings": findings, "risk": risk}, confidence=round(r.uniform(0.7, 0.95), 3), cost=cost)


@activity("proposal_synthesize")
async def proposal_synthesize(data: dict[str, Any]) -> Result:
    """Merge the reviews into a first draft."""
    r = rng("proposal_synthesize", data)
    reviews = data.get("reviews") or {}
    findings = sum(len((v or {}).get("findings", [])) for v in reviews.values()) if isinstance(reviews, dict) else 0
    draft = f"Proposal draft covering {len(reviews)} reviews and {findings} findings"
    cost = await model_call(r, "large-llm", 0.8, 2500, 1200, stream=draft)
    return Result({"draft": draft, "findings": findings, "revision": 0},
                  confidence=round(r.uniform(0.6, 0.8), 3), cost=cost)


@activity("proposal_refine")
async def proposal_refine(data: dict[str, Any]) -> Result:
    """One round of the quality loop: improve the draft and score it. Scores grow with the round."""
    round_ = int(data.get("round", 0))
    r = rng("proposal_refine", data)
    cost = await model_call(r, "large-llm", 0.5, 2000, 900)
    base = r.uniform(0.55, 0.8)
    score = round(min(0.99, base + 0.1 * round_ + r.uniform(0, 0.05)), 3)
    previous = data.get("previous") or {}
    draft = previous.get("draft") if isinstance(previous, dict) and previous.get("draft") else data.get("draft", "")
    return Result({"draft": f"{draft} (revision {round_ + 1})", "score": score, "round": round_, "iterations": round_ + 1}, confidence=score, cost=cost)


@activity("proposal_plan")
async def proposal_plan(data: dict[str, Any]) -> Result:
    """Plan the actions that deliver the proposal (2 to 5 of them)."""
    r = rng("proposal_plan", data)
    cost = await model_call(r, "medium-llm", 0.4, 1200, 400)
    kinds = ["schedule_kickoff", "reserve_team", "draft_contract", "notify_sales", "open_project", "book_review"]
    actions = [{"n": i + 1, "kind": kind} for i, kind in enumerate(r.sample(kinds, r.randint(2, 5)))]
    return Result({"actions": actions}, confidence=round(r.uniform(0.75, 0.95), 3), cost=cost)


@activity("proposal_execute_action", concurrency=4)
async def proposal_execute_action(data: dict[str, Any]) -> Result:
    """Carry out one planned action (a tool call: short, no tokens)."""
    r = rng("proposal_execute_action", data)
    await asyncio.sleep(r.uniform(0.05, 0.15) * _scale())
    action = data.get("action") or {}
    return Result({"n": action.get("n"), "kind": action.get("kind"), "done": True}, confidence=1.0, cost={"usd": 0.0005, "model": "tool"})


@activity("proposal_verify")
async def proposal_verify(data: dict[str, Any]) -> Result:
    """Check that every planned action was done and the proposal passed its quality bar."""
    r = rng("proposal_verify", data)
    cost = await model_call(r, "medium-llm", 0.3, 900, 120)
    results = list(data.get("results") or [])
    done = sum(1 for x in results if isinstance(x, dict) and x.get("done"))
    ok = done == len(results) and float(data.get("score") or 0) >= 0.5
    return Result({"verified": ok, "actions_done": done}, confidence=0.9, cost=cost)


# --- generic AI building blocks used by docs/patterns -------------------------------------------


@activity("llm_classify")
async def llm_classify(data: dict[str, Any]) -> Result:
    """A classifier with a confidence: ``text`` → intent. Short or vague texts get low confidence."""
    r = rng("llm_classify", data)
    text = str(data.get("text", "")).lower()
    cost = await model_call(r, "small-llm", 0.1, 200, 10)
    intent = "refund" if "refund" in text else "question" if "?" in text else "other"
    confidence = round(min(0.99, 0.4 + 0.06 * _words(text) + r.uniform(0, 0.1)), 3)
    return Result({"intent": intent}, confidence=confidence, cost=cost)


@activity("llm_complexity")
async def llm_complexity(data: dict[str, Any]) -> Result:
    """Rates a task ``small`` | ``medium`` | ``large`` by the length of its text (for model selection)."""
    r = rng("llm_complexity", data)
    words = _words(data.get("text"))
    cost = await model_call(r, "small-llm", 0.05, 150, 5)
    tier = "small" if words < 20 else "medium" if words < 80 else "large"
    return Result({"tier": tier, "words": words}, confidence=0.9, cost=cost)


@activity("llm_generate")
async def llm_generate(data: dict[str, Any]) -> Result:
    """Generate with the model named in the input (``model``: small-llm | medium-llm | large-llm)."""
    model = str(data.get("model", "medium-llm"))
    if model not in MODELS:
        raise ActivityError(f"unknown model {model!r}", type="UnknownModel", retryable=False)
    r = rng("llm_generate", data)
    size = {"small-llm": 0.1, "medium-llm": 0.3, "large-llm": 0.8}[model]
    cost = await model_call(r, model, size, 100 + 4 * _words(data.get("prompt")), int(data.get("max_tokens", 200)))
    return Result({"text": f"[{model}] answer to: {str(data.get('prompt', ''))[:80]}", "model": model}, confidence=round(r.uniform(0.6, 0.95), 3), cost=cost)


@activity("llm_chat_turn")
async def llm_chat_turn(data: dict[str, Any]) -> Result:
    """One turn of a conversation: appends a message of about 400 tokens to ``history``."""
    r = rng("llm_chat_turn", data)
    history = list(data.get("history") or [])
    cost = await model_call(r, "medium-llm", 0.05, 100 + 10 * len(history), 400)
    history.append({"turn": int(data.get("turn", len(history))), "text": "x" * 1600})  # ~400 tokens
    return Result({"history": history}, confidence=0.8, cost=cost)


@activity("llm_summarize")
async def llm_summarize(data: dict[str, Any]) -> Result:
    """Compress a history into one short summary message."""
    r = rng("llm_summarize", data)
    history = list(data.get("history") or [])
    cost = await model_call(r, "small-llm", 0.1, 400 * max(1, len(history)), 150)
    return Result({"history": [{"summary": f"summary of {len(history)} messages"}]}, confidence=0.85, cost=cost)


@activity("llm_embed_batch", batched=True)
async def llm_embed_batch(items: list[Any]) -> list[Result]:
    """A batched model call: one call embeds every text of the batch (one result per input, same order)."""
    r = rng("llm_embed_batch", items)
    await asyncio.sleep(0.1 * _scale())
    out = []
    for item in items:
        text = str((item or {}).get("text", "")) if isinstance(item, dict) else str(item)
        vector = [round(b / 255, 3) for b in hashlib.sha256(text.encode()).digest()[:4]]
        out.append(Result({"text": text, "vector": vector, "batch_size": len(items)}, cost={"usd": 0.00002, "tokens_in": 1 + len(text) // 4, "model": "embed"}))
    return out


@activity("llm_expensive")
async def llm_expensive(data: dict[str, Any]) -> Result:
    """A deterministic, pricey call (for the result-cache and budget patterns)."""
    r = rng("llm_expensive", data)
    cost = await model_call(r, "large-llm", 0.3, 2000, 800)
    return Result({"answer": f"answer for {data.get('question', '')}", "draft": int(data.get("round", 0)) + 1}, confidence=0.9, cost=cost)


@activity("human_review")
async def human_review(data: dict[str, Any]) -> dict[str, Any]:
    """Stand-in for a human-review queue: records the case and returns a pending decision."""
    return {"decision": "needs_human_review", "case": data}


@activity("flaky_model")
async def flaky_model(data: dict[str, Any]) -> Result:
    """Fails with ``error_type`` (retryable unless ``retryable: false``) while ``fail`` is true."""
    if data.get("fail", True):
        raise ActivityError(f"simulated {data.get('error_type', 'ModelOverloaded')}", type=str(data.get("error_type", "ModelOverloaded")),
                            retryable=bool(data.get("retryable", True)))
    return Result({"ok": True}, confidence=0.9, cost={"usd": 0.001, "tokens_in": 100, "tokens_out": 20, "model": "small-llm"})
