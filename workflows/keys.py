"""Every id the engine derives from a run's shape, built and parsed here and nowhere else.

Ids are deterministic (a replay makes the same ones) and readable in logs:

- step key: ``<frame id>/<step id>`` (a root step's key is its id);
- frame ids below a compound step ``K``: ``K/<branch>``, ``K/<choice path>``, ``K#<iteration>``, ``K[<item>]``,
  ``K/fallback``, ``K/exhausted``, and ``<frame>~<attempt>`` for a parallel branch or map item run again
  (``<frame>~r<redrives>`` for a map item run again by a redrive);
- request id: ``<run_id>/<step key>/<attempt>``; a child run's id: ``<run_id>/<step key>``;
- timer ids: ``run:timeout`` and ``<step key>:<what>[:<attempt>]``, with ``~<redrives>`` when a redrive armed it again
  (``run_timer``).
"""
from __future__ import annotations

RUN_TIMEOUT = "run:timeout"
RUN_RETENTION = "run:retention"
"""Set when a run ends; when it fires, the finished run is forgotten (its state deleted, its run_id free again)."""


def run_timer(timer_id: str, redrives: int) -> str:
    """A timer's id after ``redrives`` redrives (the run's timeout and retention, and a step's timer armed again by a
    redrive): a copy of the timer fired before the redrive (the timer loop may send one twice across a crash) is
    then stale, not the new one."""
    return timer_id if redrives == 0 else f"{timer_id}~{redrives}"


# --- steps and frames -------------------------------------------------------------------------------


def step_key(frame_id: str, step_id: str) -> str:
    return step_id if frame_id == "root" else f"{frame_id}/{step_id}"


def sequence_ref(step_id: str, part: str) -> str:
    """The key of a compiled step list below a compound step: ``body``, ``item``, a branch, ``case0`` …"""
    return f"{step_id}/{part}"


def branch_frame(key: str, name: str) -> str:
    """A parallel branch's frame, or a choice path's (``name`` is the path)."""
    return f"{key}/{name}"


def item_frame(key: str, index: int | str) -> str:
    return f"{key}[{index}]"


def iteration_frame(key: str, iteration: int) -> str:
    return f"{key}#{iteration}"


def fallback_frame(key: str) -> str:
    return f"{key}/fallback"


def exhausted_frame(key: str) -> str:
    return f"{key}/exhausted"


def rerun_frame(frame_id: str, attempt: int) -> str:
    """A parallel branch or map item run again (``on_failure: retry``)."""
    return f"{frame_id}~{attempt}"


def redriven_frame(frame_id: str, redrives: int) -> str:
    """A map item that failed under ``on_failure: continue`` (its frame was dropped) run again by redrive ``redrives``."""
    return f"{frame_id}~r{redrives}"


def branch_of(frame_id: str) -> str:
    """The branch a (possibly re-run) frame belongs to: ``p/b~2`` → ``p/b``."""
    return frame_id.split("~", 1)[0]


def descendant_prefixes(key: str) -> tuple[str, ...]:
    """Key prefixes of every step below the compound step ``key``."""
    return (key + "/", key + "#", key + "[")


# --- requests and child runs ------------------------------------------------------------------------


def request_id(run_id: str, key: str, attempt: int) -> str:
    return f"{run_id}/{key}/{attempt}"


def parse_request_id(run_id: str, request_id: str) -> tuple[str, int] | None:
    """``(step key, attempt)`` of one of ``run_id``'s request ids, or None if it is not one."""
    prefix = run_id + "/"
    if not request_id.startswith(prefix):
        return None
    key, _, attempt = request_id[len(prefix):].rpartition("/")
    return (key, int(attempt)) if key and attempt.isdigit() else None


def is_transient(key: str) -> bool:
    """Whether a step key lies in a frame the engine drops once finished: a loop iteration, a map item, or a
    parallel branch that ran again."""
    return "#" in key or "[" in key or "~" in key


def reruns_of(key: str) -> tuple[str, ...]:
    """Frame-id prefixes of the re-runs of every frame above ``key`` (``p/b/s`` → ``p~``, ``p/b~``)."""
    return tuple(key[:i] + "~" for i, ch in enumerate(key) if ch == "/")


def child_run_id(run_id: str, key: str) -> str:
    return f"{run_id}/{key}"


# --- timers ---------------------------------------------------------------------------------------


def attempt_timeout(key: str, attempt: int) -> str:
    """An activity attempt's deadline (or a sub-workflow step's, attempt 1)."""
    return f"{key}:timeout:{attempt}"


def start_timeout(key: str, attempt: int) -> str:
    """An activity attempt's ``start_timeout``: armed with its request, cleared when its handler starts."""
    return f"{key}:start_timeout:{attempt}"


def run_timeout(key: str, attempt: int) -> str:
    """An activity attempt's ``run_timeout``: armed when its handler starts."""
    return f"{key}:run_timeout:{attempt}"


def heartbeat_timer(key: str, attempt: int, beats: int) -> str:
    """An activity attempt's ``heartbeat`` deadline after ``beats`` heartbeats: each heartbeat arms a timer of its own,
    so a copy of the one it replaced, fired before it was replaced, is stale and not the new one."""
    return f"{key}:heartbeat:{attempt}:{beats}"


_ATTEMPT_DEADLINES = (":timeout:", ":start_timeout:", ":run_timeout:")


def timed_out_request(run_id: str, timer_id: str) -> str | None:
    """The request id whose deadline ``timer_id`` is, when it is one of an activity attempt's deadlines (its
    ``timeout``, ``start_timeout``, ``run_timeout`` or ``heartbeat``), else None: a worker's completion of that request
    in the log before the timer fired answers it (``streams.coordinator.fence``)."""
    key, sep, rest = timer_id.rpartition(":heartbeat:")
    if sep:
        attempt, colon, beats = rest.partition(":")
        return request_id(run_id, key, int(attempt)) if colon and attempt.isdigit() and beats.isdigit() else None
    for deadline in _ATTEMPT_DEADLINES:
        key, sep, attempt = timer_id.rpartition(deadline)
        if sep:
            return request_id(run_id, key, int(attempt)) if attempt.isdigit() else None
    return None


def retry_timer(key: str, attempt: int) -> str:
    return f"{key}:retry:{attempt}"


def loop_timeout(key: str, redrives: int = 0) -> str:
    return run_timer(f"{key}:loop_timeout", redrives)


def join_timeout(key: str, redrives: int = 0) -> str:
    return run_timer(f"{key}:join_timeout", redrives)


def wait_timeout(key: str, redrives: int = 0) -> str:
    return run_timer(f"{key}:wait_timeout", redrives)


def sleep_timer(key: str, redrives: int = 0) -> str:
    return run_timer(f"{key}:sleep", redrives)


def timer_pending(raw_state: bytes, timer_id: str) -> bool:
    """Whether a stored run state (its compact JSON bytes) still holds ``timer_id``: a test without decoding.

    A pending timer is stored as ``"<timer id>":{"due_ms":…`` in ``RunState.timers`` (``due_ms`` is the first
    field of a ``Timer`` and has no default), which no other part of a state looks like."""
    return b'"' + timer_id.encode() + b'":{"due_ms":' in raw_state

