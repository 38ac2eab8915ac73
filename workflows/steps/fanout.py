"""``parallel:`` and ``map:`` steps: frames run side by side and a join decides when the step ends."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from legato.topics.models import ErrorInfo
from legato.workflows import keys
from legato.workflows.expressions import ExpressionError
from legato.workflows.model import DefaultValue, MapStep, NOf
from legato.workflows.state import StepState, Timer
from legato.workflows.steps.base import Processor, unfinished_frames

if TYPE_CHECKING:
    from legato.workflows.context import Run
    from legato.workflows.state import Frame, RunState

DEFAULT_MAP_CONCURRENCY = 256
"""Item sub-flows a map keeps in flight when it sets no ``max_concurrency``: every one in flight is held in the
run's state, so an unbounded 10,000-item fan-out could not fit the state limit (it measured 8 MB)."""

BRANCH_ATTEMPTS = 3
"""How often a parallel branch with ``on_failure: retry`` runs before its failure fails the step."""


class FanOutProcessor(Processor):
    def start(self, run: "Run", step: StepState, definition: Any, frame: "Frame", variables: dict[str, Any]) -> None:
        if isinstance(definition, MapStep):
            self._start_map(run, step, definition, frame, variables)
            return
        spec = definition.parallel
        step.total = len(spec.branches)
        frames = [run.child_frame(step, keys.branch_frame(step.key, name), keys.sequence_ref(definition.id, name), frame, name=name) for name in spec.branches]
        _arm_join_timeout(run, step, spec)
        for child in frames:  # all frames exist before any starts, so no join fires early
            run.advance(child.id)

    def child_finished(self, run: "Run", step: StepState, definition: Any, frame: "Frame") -> None:
        is_map = isinstance(definition, MapStep)
        spec = definition.map if is_map else definition.parallel
        name = frame.name or ""
        if frame.status == "succeeded":
            step.results[name] = frame.last_output
            if frame.last_confidence is not None:
                step.confidences[name] = frame.last_confidence
            step.succeeded_n += 1
        else:
            policy = spec.failure_policy if is_map else spec.branch_policy(name)
            if policy == "retry" and frame.attempt < BRANCH_ATTEMPTS:
                # run the branch (or the map item) again from its first step, with the same scope
                base = keys.item_frame(step.key, name) if is_map else keys.branch_frame(step.key, name)
                scope = {k: frame.scope[k] for k in ("item", "index") if k in frame.scope}
                run.drop_frame(frame)
                retry = run.child_frame(step, keys.rerun_frame(base, frame.attempt + 1), frame.ref, run.state.frames[step.frame], name=name, **scope)
                retry.attempt = frame.attempt + 1
                run.advance(retry.id)
                return
            if isinstance(policy, DefaultValue):
                step.results[name] = policy.default
                step.succeeded_n += 1
            elif policy == "continue":
                step.failed_n += 1
                step.error = frame.error
            else:  # fail_fast, or retry exhausted
                run.cancel_children(step, "a branch failed")
                run.clear_timer(keys.join_timeout(step.key, run.state.redrives))
                run.failed_finally(step, frame.error, "failed")
                return
        step.done_n += 1
        if is_map:
            run.drop_frame(frame)  # keep the state small: the result is in step.results
        verdict = _join_verdict(step, spec.join, frame.status == "succeeded" or name in step.results)
        if verdict is None:
            if is_map and (step.redo or step.next_index < step.total):
                _start_item(run, step, definition, run.state.frames[step.frame])
            return
        run.clear_timer(keys.join_timeout(step.key, run.state.redrives))
        run.cancel_children(step, "the join is complete")
        if verdict:
            step.output = _output(run, step, is_map)
            step.confidence = _confidence(step, spec.confidence, winner=name)
            run.finish_step(step, "succeeded")
        else:
            error = step.error or ErrorInfo(type="JoinFailed", message=f"{step.step_id}: too few branches succeeded for join {_join_name(spec.join)}", retryable=False)
            run.failed_finally(step, error, "failed")

    def timer(self, run: "Run", step: StepState, timer: Timer) -> None:
        if timer.kind != "join_timeout" or step.status != "running":
            return
        definition = run.wf.steps[step.step_id]
        is_map = isinstance(definition, MapStep)
        spec = definition.map if is_map else definition.parallel
        run.cancel_children(step, "join timeout", status="timed_out")
        if spec.on_timeout == "proceed":
            step.output = _output(run, step, is_map)
            step.confidence = _confidence(step, spec.confidence, winner=None)
            run.finish_step(step, "succeeded")
        else:
            error = ErrorInfo(type="JoinTimeout", message=f"{step.step_id}: {step.done_n} of {step.total} branches finished within the timeout", retryable=False)
            run.failed_finally(step, error, "timed_out")

    def cancel(self, run: "Run", step: StepState, reason: str) -> bool:
        run.clear_timer(keys.join_timeout(step.key, run.state.redrives))
        return False

    def redrive_frames(self, state: "RunState", step: StepState, definition: Any) -> list["Frame"] | str:
        """The branches (map items) that failed or were cancelled and gave no result, each from its step that failed;
        the others keep their results. (A map's items that failed under ``on_failure: continue`` left no frame:
        ``redrive`` runs them again from their first step.)"""
        frames = [f for f in unfinished_frames(state, step) if f.name not in step.results]
        if frames or step.redo or _dropped_failures(state, step):
            return frames
        error = f"{step.error.type}: {step.error.message}" if step.error else "failed"
        return f"nothing failed inside the {step.kind} step {step.step_id!r} ({error}): trigger the run again"

    def redrive(self, run: "Run", step: StepState, definition: Any) -> None:
        """Resume those branches (items); one that failed under ``on_failure: continue`` is no longer counted as done,
        and a map item of those starts again in a frame of its own (``keys.redriven_frame``, so no request id
        repeats), as many at once as ``max_concurrency`` leaves room for, the others before the items not started
        yet; the join's timeout restarts."""
        frames = self.redrive_frames(run.state, step, definition)
        assert not isinstance(frames, str), frames  # the machine's guard refused it
        is_map = isinstance(definition, MapStep)
        spec = definition.map if is_map else definition.parallel
        for frame in frames:
            policy = spec.failure_policy if is_map else spec.branch_policy(frame.name or "")
            if frame.status == "failed" and policy == "continue":
                step.failed_n -= 1
                step.done_n -= 1
        dropped = _dropped_failures(run.state, step)
        step.failed_n -= len(dropped)
        step.done_n -= len(dropped)
        step.redo = sorted(step.redo + dropped)  # with those an earlier redrive had no room to start yet
        _arm_join_timeout(run, step, spec)
        for frame in frames:
            run.resume_frame(frame)
        if step.redo:
            room = (spec.max_concurrency or DEFAULT_MAP_CONCURRENCY) - len(frames)
            for _ in range(min(max(room, 0), len(step.redo))):
                _start_item(run, step, definition, run.state.frames[step.frame])

    def _start_map(self, run: "Run", step: StepState, definition: MapStep, frame: "Frame", variables: dict[str, Any]) -> None:
        items = run.wf.expr(f"{definition.id}.items").evaluate(variables, run.claims)
        if not isinstance(items, list):
            raise ExpressionError(f"map items {definition.map.items!r} gave {type(items).__name__}, not a list")
        step.items, step.total = items, len(items)
        run.grow(len(orjson.dumps(items)))  # the step holds its own copy of the list
        if not items:
            run.finish_step(step, "succeeded", output=[])
            return
        _arm_join_timeout(run, step, definition.map)
        limit = definition.map.max_concurrency or DEFAULT_MAP_CONCURRENCY
        for _ in range(min(limit, len(items))):
            _start_item(run, step, definition, frame)


def _arm_join_timeout(run: "Run", step: StepState, spec: Any) -> None:
    if spec.timeout is not None:
        run.set_timer(keys.join_timeout(step.key, run.state.redrives), spec.timeout, "join_timeout", target=step.key)


def _start_item(run: "Run", step: StepState, definition: MapStep, parent: "Frame") -> None:
    """Start the next item: one a redrive runs again first (``redo``), else the next not started."""
    if step.redo:
        index = step.redo.pop(0)
        frame_id = keys.redriven_frame(keys.item_frame(step.key, index), run.state.redrives)
    else:
        index = step.next_index
        step.next_index += 1
        frame_id = keys.item_frame(step.key, index)
    child = run.child_frame(step, frame_id, keys.sequence_ref(definition.id, "item"), parent, name=str(index), item=step.items[index], index=index)
    run.advance(child.id)


def _dropped_failures(state: "RunState", step: StepState) -> list[int]:
    """A map's items that failed under ``on_failure: continue`` and are counted in ``failed_n``: started, without a
    result, without a frame (a map drops an item's frame once it is counted), and not waiting in ``redo``."""
    if step.kind != "map" or not step.failed_n:
        return []
    live = {state.frames[f].name for f in step.children if f in state.frames}
    return [i for i in range(step.next_index) if str(i) not in step.results and str(i) not in live and i not in step.redo]


def _join_verdict(step: StepState, join: Any, last_ok: bool) -> bool | None:
    """True: the join is satisfied; False: it can no longer be; None: wait for more branches."""
    remaining = step.total - step.done_n
    if join == "all":
        return None if remaining else True
    if join == "any":
        return last_ok
    if join == "first_success":
        return True if step.succeeded_n else (None if remaining else False)
    need = join.n_of if isinstance(join, NOf) else step.total
    if step.succeeded_n >= need:
        return True
    return False if step.succeeded_n + remaining < need else None


def _output(run: "Run", step: StepState, is_map: bool) -> Any:
    if is_map:
        return [step.results.get(str(i)) for i in range(step.total)]
    definition = run.wf.steps[step.step_id]
    return {name: step.results[name] for name in definition.parallel.branches if name in step.results}


def _confidence(step: StepState, aggregate: str, winner: str | None) -> float | None:
    """The step's confidence from its branches' (those that gave one): ``min``, ``mean``, or the ``winner``'s (the
    branch that completed the join; none when a timeout ended it)."""
    if aggregate == "winner":
        return step.confidences.get(winner) if winner is not None else None
    values = list(step.confidences.values())
    if not values:
        return None
    return min(values) if aggregate == "min" else round(sum(values) / len(values), 9)


def _join_name(join: Any) -> str:
    return f"n_of {join.n_of}" if isinstance(join, NOf) else str(join)
