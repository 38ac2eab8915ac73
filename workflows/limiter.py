"""The pure limiter: one budget per limit and key, decided without Kafka or a clock (``now_ms`` comes in).

``decide(state, record, now_ms) -> (state, grants)`` takes an acquisition, a release, or nothing (a tick: time
passed) and returns the key's new state and the acquisitions it admits now. The shell (``streams/limiter.py``) stores
the state in a compacted changelog in the transaction that sends the grants.

- **Rates** (``requests_per_minute``, ``tokens_per_minute``): GCRA, a virtual schedule. Each grant moves the key's
  theoretical arrival time (TAT) on by one emission interval ``T`` (60 s / rate; tokens: ``cost`` × ``T``); a grant
  is allowed while ``now >= TAT - tau``. ``tau`` admits a burst of 2 % of a 10 s budget, so any window of ``W``
  seconds admits at most ``W / T + 1 + burst`` requests: within 5 % of the budget over 10 s once it is 60 or more
  requests (360 per minute). Requests and tokens are paced at ``PACE`` (92 %) of their rate, the room for the coordinators'
  uneven delivery of grants to the workers. A request's tokens are charged when it is granted (its ``approx_tokens``) and corrected
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
- **Trigger order of keyed runs across partitions**: a run waiting for its concurrency key (the limit ``run:<workflow>``)
  is granted only once every trigger partition has decided every trigger older than it (``decided_ms``, the lowest
  of the partitions' marks, ``limit.triggers_decided``): a trigger on a partition whose coordinator was killed is
  decided seconds late, and a later trigger of its key must not take the key meanwhile. A run waits for the marks at
  most ``ORDER_WAIT_MAX_MS`` (a partition nobody serves cannot hold a key for ever).
"""
from __future__ import annotations

from typing import Any

import msgspec

from legato.topics.limits import RUN_LIMIT_PREFIX, LimitAcquire, LimitGranted, LimitRelease, LimitSpec

AGEING_MS = 10_000
"""A waiter gains one priority level per this long waited."""

BURST_SHARE = 0.02
"""The burst GCRA admits, as a share of a 10 s budget."""

WINDOW_MS = 10_000

ORDER_WAIT_MAX_MS = 30_000
"""The longest a keyed run waits for the trigger partitions' marks once it could start: a coordinator is replaced
within its session timeout (6 s by default), so only a partition that nobody serves for this long lets a later
trigger of a key go first."""

PACE = 0.92
"""Requests are granted at this share of ``requests_per_minute``: the coordinators deliver grants to the workers
unevenly (a batch, a busy partition, a takeover), and the 8 % is the room for that, so that what reaches the workers
stays within 5 % of the budget over any 10 s (tests/integration/test_limits_cluster.py on a loaded 2-core machine:
109 / 100 at full pace, 105 / 100 at 95 %)."""


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


def decide(state: KeyState | None, record: LimitAcquire | LimitRelease | None, now_ms: int,
           decided_ms: int | None = None) -> tuple[KeyState | None, list[LimitGranted]]:
    """Apply ``record`` (None: only time passed) to the key's ``state`` (changed in place) and grant what fits now.
    A repeated acquisition (already waiting or holding) and a release of an unknown id change nothing.

    ``decided_ms``: every trigger with an earlier timestamp has been decided on every trigger partition (0: not known
    yet); a run concurrency key grants no run triggered at or after it. None: no such gate."""
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
    return state, _grant(state, now_ms, decided_ms)


def due_ms(state: KeyState, now_ms: int, decided_ms: int | None = None) -> int | None:
    """When the head waiter may be granted by time alone (a rate, a pause, the longest wait for the trigger marks), or
    None (nobody waits, or only a release of a grant held can let it in). A mark that lets it in comes as a record."""
    head = _head(state, now_ms)
    if head is None:
        return None
    if state.concurrency is not None and len(state.holders) >= state.concurrency:
        return None
    due = max(now_ms, state.paused_until_ms)
    if _unsettled(state, head, now_ms, decided_ms):
        due = max(due, head.since_ms + ORDER_WAIT_MAX_MS)
    if state.requests_per_minute is not None:
        due = max(due, int(state.request_tat - _request_tau(state.requests_per_minute)) + 1)
    if state.tokens_per_minute is not None:
        due = max(due, int(state.token_tat - _tau(state.tokens_per_minute)) + 1)
    return due


def idle(state: KeyState) -> bool:
    """Nothing held or waiting: the key's record may be deleted (its TATs are in the past once the rates allow)."""
    return not state.holders and not state.waiting


def bound(spec: LimitSpec, window_ms: int = WINDOW_MS) -> float:
    """The most requests GCRA admits in any window of ``window_ms`` (the test's and the benchmark's yardstick)."""
    assert spec.requests_per_minute is not None
    return window_ms / _interval(spec.requests_per_minute) + 1 + burst(spec.requests_per_minute)


def _interval(requests_per_minute: float) -> float:
    """The emission interval of requests, in ms: paced at ``PACE`` of the budget."""
    return 60_000 / (requests_per_minute * PACE)


def burst(per_minute: float) -> int:
    """Requests (or tokens) beyond the steady rate that may go at once: 2 % of a 10 s budget."""
    return int(BURST_SHARE * per_minute * WINDOW_MS / 60_000)


def _request_tau(requests_per_minute: float) -> float:
    return burst(requests_per_minute) * _interval(requests_per_minute)


def _token_interval(tokens_per_minute: float) -> float:
    """The emission interval of one token, in ms: paced at ``PACE`` of the budget, like requests."""
    return 60_000 / (tokens_per_minute * PACE)


def _tau(tokens_per_minute: float) -> float:
    return burst(tokens_per_minute) * _token_interval(tokens_per_minute)


def token_bound(spec: LimitSpec, window_ms: int = WINDOW_MS, largest: int = 0) -> float:
    """The most tokens GCRA charges in any window of ``window_ms``: the paced rate, the burst, and one request of
    ``largest`` tokens that the bucket admitted when free (its cost is paid back after)."""
    assert spec.tokens_per_minute is not None
    return window_ms / _token_interval(spec.tokens_per_minute) + burst(spec.tokens_per_minute) + largest


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
        state.token_tat += (record.cost - held.cost) * _token_interval(state.tokens_per_minute)
    if record.pause_ms:
        state.paused_until_ms = max(state.paused_until_ms, now_ms + record.pause_ms)
        state.pauses += 1


def _rank(waiter: Waiter, now_ms: int) -> tuple[int, int, int]:
    return (-(waiter.priority + max(0, now_ms - waiter.since_ms) // AGEING_MS), waiter.since_ms, waiter.seq)


def _head(state: KeyState, now_ms: int) -> Waiter | None:
    return min(state.waiting, key=lambda w: _rank(w, now_ms)) if state.waiting else None


def _unsettled(state: KeyState, head: Waiter, now_ms: int, decided_ms: int | None) -> bool:
    """A keyed run that an earlier trigger, not decided yet on some partition, may still have to precede."""
    return (decided_ms is not None and state.limit.startswith(RUN_LIMIT_PREFIX) and head.since_ms >= decided_ms
            and now_ms - head.since_ms < ORDER_WAIT_MAX_MS)


def _grant(state: KeyState, now_ms: int, decided_ms: int | None = None) -> list[LimitGranted]:
    grants: list[LimitGranted] = []
    while state.waiting and now_ms >= state.paused_until_ms:
        if state.concurrency is not None and len(state.holders) >= state.concurrency:
            break
        rpm, tpm = state.requests_per_minute, state.tokens_per_minute
        if rpm is not None and now_ms < state.request_tat - _request_tau(rpm):
            break
        if tpm is not None and now_ms < state.token_tat - _tau(tpm):
            break
        head = _head(state, now_ms)
        assert head is not None
        if _unsettled(state, head, now_ms, decided_ms):
            break
        state.waiting.remove(head)
        if rpm is not None:
            state.request_tat = max(state.request_tat, now_ms) + _interval(rpm)
        if tpm is not None:
            state.token_tat = max(state.token_tat, now_ms) + head.cost * _token_interval(tpm)
        state.holders[head.id] = Holder(id=head.id, run_id=head.run_id, cost=head.cost, granted_ms=now_ms)
        state.granted += 1
        grants.append(LimitGranted(run_id=head.run_id, id=head.id, limit=state.limit, key=state.key, granted_ms=now_ms, waited_ms=now_ms - head.since_ms))
    return grants


def usage(state: KeyState) -> dict[str, Any]:
    """What the key uses now against its limits (for metrics and views)."""
    return {"concurrency": len(state.holders), "waiting": len(state.waiting), "paused": state.paused_until_ms}
