"""Run states decoded from a partition's table, kept for the next events of the same runs."""
from __future__ import annotations

from collections import OrderedDict

from legato.workflows.state import RunState

_DECODED_STATES = 1_000
"""Decoded run states kept between events (keyed by the exact bytes in the table, so never stale)."""


class DecodedStates:
    """The last ``_DECODED_STATES`` states decoded or stored, each with the bytes it was decoded from."""

    def __init__(self) -> None:
        self._states: OrderedDict[str, tuple[bytes, RunState]] = OrderedDict()

    def load(self, run_id: str, raw: bytes | None) -> RunState | None:
        """The run's state, reusing the object decoded last time while the table still holds those bytes."""
        if raw is None:
            return None
        cached = self._states.get(run_id)
        if cached is not None and cached[0] == raw:
            self._states.move_to_end(run_id)
            return cached[1]
        state = RunState.model_validate_json(raw)
        self.remember(run_id, raw, state)
        return state

    def remember(self, run_id: str, raw: bytes, state: RunState) -> None:
        self._states[run_id] = (raw, state)
        self._states.move_to_end(run_id)
        if len(self._states) > _DECODED_STATES:
            self._states.popitem(last=False)

    def drop(self, run_id: str) -> None:
        """The run's state object is about to change in place (or the run was forgotten)."""
        self._states.pop(run_id, None)

    def clear(self) -> None:
        self._states.clear()
