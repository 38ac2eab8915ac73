"""The pure limiter: one budget per limit and key, decided without Kafka or a clock (``now_ms`` comes in).

``decide(state, record, now_ms) -> (state, grants)`` takes an acquisition, a release, or nothing (a tick: time
passed) and returns the key's new state and the acquisitions it admits now. The shell (``streams/limiter.py``) stores
the state in a compacted changelog in the transaction that sends the grants.

- **Rates** (``requests_per_minute``, ``tokens_per_minute``): GCRA, a virtual schedule. Each grant moves the key's
  theoretical arrival time (TAT) on by one emission interval ``T`` (60 s / rate; tokens: ``cost`` × ``T``); a grant
  is allowed while ``now >= TAT - tau``. ``tau`` admits a burst of 2 % of a 10 s budget, so any window of ``W``
  seconds admits at most ``W / T + 1 + burst`` requests: within 5 % of the budget over 10 s once it is 60 or more
  requests (360 per minute). A request's tokens are charged when it is granted (its ``approx_tokens``) and corrected
  by its real cost on release, so an estimate that was too low is paid back by the next ones.
- **Concurrency**: grants held and not yet released, at most ``concurrency``.
- **Pauses**: a release that carries ``pause_ms`` (the API answered 429 with ``retry_after``) stops every grant of the
  key until then.
- **Order**: waiters are granted one at a time, the best first: highest priority (1–5) plus one level per 10 s
  waited, then the oldest. A waiter of priority 1 ranks with a fresh priority 5 after 40 s and above it after 50 s,
  so it waits at most 50 s plus what the waiters ahead of it need: none starves. Waiting counts from the
  acquisition's ``requested_ms`` (the coordinator's decision), so equals go in the order their runs asked even when
  their acquisitions arrive from several coordinator partitions out of that order. The head of the queue is never
  overtaken by a cheaper waiter behind it.
"""
from __future__ import annotations

from typing import Any

import msgspec

from legato.topics.limits import LimitAcquire, LimitGranted, LimitRelease, LimitSpec

AGEING_MS = 10_000
"""A waiter gains one priority level per this long waited."""

BURST_SHARE = 0.02
"""The burst GCRA admits, as a share of a 10 s budget."""

WINDOW_MS = 10_000


class Holder(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    run_id: str
    cost: int = 0
    granted_ms: int = 0


class Waiter(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    run_id: str
    priority: int = 3
    cost: int = 0
    since_ms: int = 0
    seq: int = 0


class KeyState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One limit's budget for one key."""

    limit: str
    key: str = ""
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    concurrency: int | None = None
    request_tat: float = 0.0  # GCRA theoretical arrival time of the next request, epoch ms
    token_tat: float = 0.0
    paused_until_ms: int = 0
    holders: dict[str, Holder] = msgspec.field(default_factory=dict)
    waiting: list[Waiter] = msgspec.field(default_factory=list)
    seq: int = 0
    granted: int = 0  # grants made, ever
    pauses: int = 0  # pauses by a 429, ever

    def encoded(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def decoded(cls, raw: bytes) -> "KeyState":
        return _DECODER.decode(raw)

    def spec(self) -> LimitSpec:
        return LimitSpec(requests_per_minute=self.requests_per_minute, tokens_per_minute=self.tokens_per_minute, concurrency=self.concurrency)


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(KeyState)


def decide(state: KeyState | None, record: LimitAcquire | LimitRelease | None, now_ms: int) -> tuple[KeyState | None, list[LimitGranted]]:
    """Apply ``record`` (None: only time passed) to the key's ``state`` (changed in place) and grant what fits now.
    A repeated acquisition (already waiting or holding) and a release of an unknown id change nothing."""
    if isinstance(record, LimitAcquire):
        if state is None:
            state = KeyState(limit=record.limit, key=record.key)
        _adopt(state, record.spec)
        if record.id not in state.holders and all(w.id != record.id for w in state.waiting):
            state.seq += 1
            # waiting counts from the coordinator's decision: acquisitions from several coordinator partitions reach
            # the key in any order, and equals are granted in the order their runs asked (trigger order)
            since = min(now_ms, record.requested_ms) if record.requested_ms else now_ms
            state.waiting.append(Waiter(id=record.id, run_id=record.run_id, priority=record.priority, cost=record.cost, since_ms=since, seq=state.seq))
    elif isinstance(record, LimitRelease) and state is not None:
        _release(state, record, now_ms)
    if state is None:
        return None, []
    return state, _grant(state, now_ms)


def due_ms(state: KeyState, now_ms: int) -> int | None:
    """When the head waiter may be granted by time alone (a rate or a pause), or None (nobody waits, or only a release
    of a grant held can let it in)."""
    head = _head(state, now_ms)
    if head is None:
        return None
    if state.concurrency is not None and len(state.holders) >= state.concurrency:
        return None
    due = max(now_ms, state.paused_until_ms)
    if state.requests_per_minute is not None:
        due = max(due, int(state.request_tat - _tau(state.requests_per_minute)) + 1)
    if state.tokens_per_minute is not None:
        due = max(due, int(state.token_tat - _tau(state.tokens_per_minute)) + 1)
    return due


def idle(state: KeyState) -> bool:
    """Nothing held or waiting: the key's record may be deleted (its TATs are in the past once the rates allow)."""
    return not state.holders and not state.waiting


def bound(spec: LimitSpec, window_ms: int = WINDOW_MS) -> float:
    """The most requests GCRA admits in any window of ``window_ms`` (the test's and the benchmark's yardstick)."""
    assert spec.requests_per_minute is not None
    interval = 60_000 / spec.requests_per_minute
    return window_ms / interval + 1 + burst(spec.requests_per_minute)


def burst(per_minute: float) -> int:
    """Requests (or tokens) beyond the steady rate that may go at once: 2 % of a 10 s budget."""
    return int(BURST_SHARE * per_minute * WINDOW_MS / 60_000)


def _tau(per_minute: float) -> float:
    return burst(per_minute) * 60_000 / per_minute


def _adopt(state: KeyState, spec: LimitSpec) -> None:
    """The budget of the latest acquisition is the key's (a limit deployed again with other numbers)."""
    state.requests_per_minute = spec.requests_per_minute
    state.tokens_per_minute = spec.tokens_per_minute
    state.concurrency = spec.concurrency


def _release(state: KeyState, record: LimitRelease, now_ms: int) -> None:
    held = state.holders.pop(record.id, None)
    if held is None:
        state.waiting = [w for w in state.waiting if w.id != record.id]
    elif record.cost is not None and state.tokens_per_minute is not None and record.cost != held.cost:
        state.token_tat += (record.cost - held.cost) * 60_000 / state.tokens_per_minute
    if record.pause_ms:
        state.paused_until_ms = max(state.paused_until_ms, now_ms + record.pause_ms)
        state.pauses += 1


def _rank(waiter: Waiter, now_ms: int) -> tuple[int, int, int]:
    return (-(waiter.priority + max(0, now_ms - waiter.since_ms) // AGEING_MS), waiter.since_ms, waiter.seq)


def _head(state: KeyState, now_ms: int) -> Waiter | None:
    return min(state.waiting, key=lambda w: _rank(w, now_ms)) if state.waiting else None


def _grant(state: KeyState, now_ms: int) -> list[LimitGranted]:
    grants: list[LimitGranted] = []
    while state.waiting and now_ms >= state.paused_until_ms:
        if state.concurrency is not None and len(state.holders) >= state.concurrency:
            break
        rpm, tpm = state.requests_per_minute, state.tokens_per_minute
        if rpm is not None and now_ms < state.request_tat - _tau(rpm):
            break
        if tpm is not None and now_ms < state.token_tat - _tau(tpm):
            break
        head = _head(state, now_ms)
        assert head is not None
        state.waiting.remove(head)
        if rpm is not None:
            state.request_tat = max(state.request_tat, now_ms) + 60_000 / rpm
        if tpm is not None:
            state.token_tat = max(state.token_tat, now_ms) + head.cost * 60_000 / tpm
        state.holders[head.id] = Holder(id=head.id, run_id=head.run_id, cost=head.cost, granted_ms=now_ms)
        state.granted += 1
        grants.append(LimitGranted(run_id=head.run_id, id=head.id, limit=state.limit, key=state.key, granted_ms=now_ms, waited_ms=now_ms - head.since_ms))
    return grants


def usage(state: KeyState) -> dict[str, Any]:
    """What the key uses now against its limits (for metrics and views)."""
    return {"concurrency": len(state.holders), "waiting": len(state.waiting), "paused": state.paused_until_ms}
