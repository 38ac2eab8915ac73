"""Demo handlers: simulated checks and model calls with fixed latencies (scaled by LEGATO_DEMO_SCALE)."""
from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

from legato.handlers.registry import ActivityError, Result, activity


def _scale() -> float:
    return float(os.environ.get("LEGATO_DEMO_SCALE", "1.0"))


async def _work(seconds: float) -> None:
    await asyncio.sleep(seconds * _scale())


def _score(text: str, low: int, high: int) -> int:
    """A stable pseudo-score for a name, so the demo is repeatable."""
    digest = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return low + digest % (high - low + 1)


# --- customer due diligence --------------------------------------------------------------------

CHECK_SECONDS = 0.5


@activity("verify_identity")
async def verify_identity(data: dict[str, Any]) -> Result:
    await _work(CHECK_SECONDS)
    name = str(data.get("name", ""))
    ok = bool(name) and not name.lower().startswith("fake")
    return Result({"verified": ok}, confidence=0.97 if ok else 0.6, cost={"usd": 0.002, "model": "id-api"})


@activity("check_credit")
async def check_credit(data: dict[str, Any]) -> Result:
    await _work(CHECK_SECONDS)
    score = int(data["credit_score"]) if "credit_score" in data else _score(str(data.get("name")), 520, 820)
    return Result({"score": score}, confidence=0.9, cost={"usd": 0.01, "model": "credit-bureau"})


@activity("check_references")
async def check_references(data: dict[str, Any]) -> Result:
    await _work(CHECK_SECONDS)
    refs = data.get("references", [])
    return Result({"positive": len(refs), "total": len(refs)}, confidence=0.8, cost={"usd": 0.004, "tokens_in": 900, "tokens_out": 120, "model": "small-llm"})


@activity("screen_background")
async def screen_background(data: dict[str, Any]) -> Result:
    await _work(CHECK_SECONDS)
    flagged = str(data.get("name", "")).lower() in {"mallory", "eve"}
    return Result({"flagged": flagged}, confidence=0.92, cost={"usd": 0.003, "model": "sanctions-list"})


@activity("approve_customer")
async def approve_customer(data: dict[str, Any]) -> dict[str, Any]:
    return {"decision": "approved", "customer": data.get("name")}


@activity("apply_review")
async def apply_review(data: dict[str, Any]) -> dict[str, Any]:
    """The reviewer's answer (the ``review`` signal's data, or the wait's ``on_timeout`` default) as a decision:
    ``{"decision": "approve"}`` approves; anything else rejects."""
    review = data.get("review")
    review = review if isinstance(review, dict) else {"decision": review}
    approved = str(review.get("decision", "")).lower() in ("approve", "approved")
    return {"decision": "approved" if approved else "rejected", "customer": data.get("name"), "reviewed": True, "review": review}


@activity("reject_customer")
async def reject_customer(data: dict[str, Any]) -> dict[str, Any]:
    return {"decision": "rejected", "customer": data.get("name")}


# --- support triage ---------------------------------------------------------------------------


@activity("classify_ticket")
async def classify_ticket(data: dict[str, Any]) -> Result:
    await _work(0.05)
    text = str(data.get("text", "")).lower()
    if any(w in text for w in ("invoice", "refund", "charge", "bill")):
        return Result({"category": "billing"}, confidence=0.93, cost={"usd": 0.001, "tokens_in": 200, "tokens_out": 5, "model": "small-llm"})
    return Result({"category": "technical" if "error" in text else "general"}, confidence=0.7, cost={"usd": 0.001, "tokens_in": 200, "tokens_out": 5, "model": "small-llm"})


@activity("lookup_customer")
async def lookup_customer(data: dict[str, Any]) -> dict[str, Any]:
    await _work(0.05)
    email = str(data.get("email", ""))
    return {"email": email, "tier": "gold" if email.endswith(".com") else "standard"}


@activity("lookup_history")
async def lookup_history(data: dict[str, Any]) -> dict[str, Any]:
    await _work(0.05)
    return {"tickets": _score(str(data.get("email")), 0, 9)}


@activity("answer_billing")
async def answer_billing(data: dict[str, Any]) -> Result:
    await _work(0.05)
    return Result({"reply": "We have looked at your invoice.", "tier": (data.get("customer") or {}).get("tier")}, confidence=0.9,
                  cost={"usd": 0.003, "tokens_in": 600, "tokens_out": 150, "model": "large-llm"})


@activity("write_reply")
async def write_reply(data: dict[str, Any]) -> Result:
    await _work(0.05)
    rounds = int(data.get("round", 0))
    score = min(1.0, 0.6 + 0.15 * rounds)  # each draft improves on the last
    return Result({"reply": f"draft {rounds + 1}", "score": round(score, 2)}, confidence=score,
                  cost={"usd": 0.004, "tokens_in": 800, "tokens_out": 300, "model": "large-llm"})


# --- tools for benchmarks and tests ------------------------------------------------------------


@activity("noop")
async def noop(data: Any) -> Any:
    return data


@activity("always_fails")
async def always_fails(data: Any) -> Any:
    raise ActivityError("this activity always fails", type="DemoFailure", retryable=bool((data or {}).get("retryable", False)))
