"""A run's state size: a running estimate of its JSON, measured exactly near the limit, enforced at the end of a decision."""
from __future__ import annotations

from typing import Any

import orjson

from legato.topics.models import ErrorInfo

DEFAULT_MAX_STATE_BYTES = 1024 * 1024 - 8 * 1024
"""A run's stored state (its JSON without defaults) may not grow past this; an output that would make it is refused
(catchable by on_error). 8 KiB under the 1 MiB a Kafka record may hold (the producer's ``max_request_size``, the
broker's ``message.max.bytes``), for the changelog record's key and framing: a state the broker refused would stop
its partition (RELIABILITY.md, Size limits)."""


class RunSize:
    """Part of ``Run`` (``legato.workflows.context``): what a decision adds to the state is counted as it goes
    (``grow``, ``too_big``) and checked against ``max_state_bytes`` (``enforce_size``)."""

    # What the running estimate adds for a new step or frame beyond the values it holds (its key, status, stamps,
    # timers, path entry and view row); values (inputs, items, outputs) are counted by their own JSON size.
    STEP_BYTES = 600

    def grow(self, nbytes: int) -> None:
        """Add ``nbytes`` to the running upper estimate of the state's JSON size (``RunState.size_hint``)."""
        self.state.size_hint += nbytes

    def _measure(self) -> int:
        size = len(self.state.encoded())  # the stored document's size
        self.state.size_hint = self.state.size_measured = size
        return size

    def _near_limit(self, estimate: int) -> bool:
        """Whether ``estimate`` could be over the limit: it grew past half the headroom the last exact measurement
        left. Measuring the whole state costs as much as storing it; re-measuring on a fixed share of the limit made
        every event of a state past half the limit (a 10,000-item map) measure the whole document, O(N) each."""
        measured = self.state.size_measured
        return estimate > measured + (self.max_state_bytes - measured) // 2

    def too_big(self, output: Any) -> str | None:
        size = len(orjson.dumps(output))
        # An accepted output is held three times: the step's output, the CEL view and its frame's last output
        # (a next step whose input copies it adds more: its request counts it, and enforce_size catches the rest).
        projected = self.state.size_hint + 3 * size
        if self._near_limit(projected):
            projected = self._measure() + 3 * size
            if projected > self.max_state_bytes:
                return f"an output of {size} bytes would grow the run's state to about {projected} bytes, over the limit of {self.max_state_bytes}"
        self.state.size_hint = projected
        return None

    def enforce_size(self) -> None:
        """The last guard: a state that still grew past the limit (an input a map copies into every item) sheds its
        outputs, so the document stays storable, and fails the run. A run that already finished (its output is one
        more copy of its last step's) cannot fail any more: its terminal event, output included, is on its way, so
        only the copies go, and the run's output too if it alone is too large."""
        if not self._near_limit(self.state.size_hint):
            return
        size = self._measure()
        if size <= self.max_state_bytes:
            return
        self._shed()
        if not self.state.finished:
            self.finish_run(False, None, ErrorInfo(type="ContextTooLarge", message=f"the run's state grew to {size} bytes, over the limit of {self.max_state_bytes}", retryable=False))
        elif self._measure() > self.max_state_bytes:
            self.state.output = None
            self._measure()

    def _shed(self) -> None:
        """Drop every output, result, item list, pending request and scope the state holds (the run's own output stays)."""
        for step in self.state.steps.values():
            step.output, step.results, step.items, step.request = None, {}, None, None
        for frame in self.state.frames.values():
            frame.last_output, frame.scope = None, {}  # a scope holds its map item or loop's previous output
        for entry in self.state.view.values():
            entry["output"] = None
        for pending in self.state.signals:
            pending.data = None
