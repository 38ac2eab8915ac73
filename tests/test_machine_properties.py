"""Property tests of the state machine: termination, one terminal event, determinism, idempotence.

A strategy builds random workflows (activity/parallel/map/choice/loop nested up to depth 3, with occasional end/fail,
wait, sleep and sub-workflow steps (a generated child workflow, whose runs are driven the same way); joins, join timeouts, failure policies per step and per branch, on_error on activities,
parallels, maps and loops, no_progress, for_each, on_exhausted steps and budgets), and an adversarial driver feeds the run: it completes a random pending request (success with a random
score, or a retryable/non-retryable failure), sends a signal a wait waits for, sends a signal nobody waits for yet
(the run keeps it), fires a random pending timer (at its due time, never moving time backwards), re-delivers an event
it already delivered, or delivers a stale completion.
"""
from __future__ import annotations

import itertools
from typing import Any

import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import event as tally
from hypothesis import strategies as st

from tests.machine_helpers import T0, dump, failed, fired, pending_requests, succeeded, terminal_events_in
from legato.topics.models import ActivityCompleted, ActivityRequested, ChildRunFinished, RunAccepted, RunRedriveRequested, SignalSent, TimerFired
from legato.workflows import keys
from legato.workflows.machine import EventIgnored, Machine, NotifyParent, PublishRunEvent, RequestActivity, StartChildRun, replay
from legato.workflows.model import compile_workflow
from legato.workflows.state import RunState

MAX_EVENTS = 500
MAX_DEPTH = 3
MAX_ITEMS = 3  # of input.xs, which map steps and for_each loops iterate over
SCORES = [0.0, 0.3, 0.6, 0.95]
SIGNALS = ["s0", "s1"]

PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# --- random workflows -------------------------------------------------------------------------------


@st.composite
def workflow_docs(draw: Any, name: str = "gen", children: bool = False) -> dict[str, Any]:
    """A random workflow; with ``children``, some steps are ``workflow: child`` (a sub-workflow)."""
    counter = itertools.count()

    def nid(prefix: str) -> str:
        return f"{prefix}{next(counter)}"

    def activity() -> dict[str, Any]:
        step: dict[str, Any] = {"id": nid("a"), "activity": draw(st.sampled_from(["alpha", "beta"])), "input": {"n": "${ input.n }"}}
        attempts = draw(st.integers(1, 3))
        if attempts > 1:
            step["retry"] = {"max_attempts": attempts, "backoff": draw(st.sampled_from(["100ms", "1s"])), "multiplier": 2, "max_backoff": "1s"}
        if draw(st.booleans()):
            step["timeout"] = "2s"
        on_error(step)
        if attempts > 1 and draw(st.booleans()):
            step["non_retryable"] = ["Boom"]
        return step

    def on_error(step: dict[str, Any]) -> dict[str, Any]:
        """The same on_error choices for every kind of step that has one (activity, parallel, map, loop)."""
        policy = draw(st.sampled_from(["fail"] * 4 + ["continue", "default", "fallback"]))
        if policy == "continue":
            step["on_error"] = "continue"
        elif policy == "default":
            step["on_error"] = {"default": {"score": 0.0, "flag": False}}
        elif policy == "fallback":
            step["on_error"] = {"fallback": [{"id": nid("a"), "activity": "rescue"}]}
        return step

    def fan_out_options(spec: dict[str, Any], width: int) -> None:
        """join / failure policy / timeout of a parallel (``width`` branches) or a map."""
        join = draw(st.sampled_from(["all", "all", "any", "first_success", "n_of"]))
        spec["join"] = {"n_of": draw(st.integers(1, width))} if join == "n_of" else join
        spec["on_failure"] = failure_policy()
        if draw(st.booleans()):
            spec["timeout"] = draw(st.sampled_from(["5s", "1m"]))
            spec["on_timeout"] = draw(st.sampled_from(["proceed", "fail"]))

    def failure_policy() -> Any:
        policy = draw(st.sampled_from(["fail_fast", "fail_fast", "continue", "retry", "default"]))
        return {"default": None} if policy == "default" else policy

    def condition(prev: str | None) -> str:
        if prev is not None and draw(st.booleans()):
            return f"steps.{prev}.output.score > {draw(st.sampled_from([0.1, 0.5]))}"
        return f"input.n > {draw(st.integers(0, 4))}"

    def sequence(depth: int, max_len: int, min_len: int = 1) -> list[dict[str, Any]]:
        steps: list[dict[str, Any]] = []
        prev: str | None = None
        for _ in range(draw(st.integers(min_len, max_len))):
            step = compound(depth, prev)
            steps.append(step)
            prev = step["id"] if "activity" in step else None
        return steps

    def wait() -> dict[str, Any]:
        spec: dict[str, Any] = {"signal": draw(st.sampled_from(SIGNALS))}
        if draw(st.booleans()):
            spec["timeout"] = draw(st.sampled_from(["5s", "1m"]))
            on_timeout = draw(st.sampled_from(["fail", "continue", "default", None]))
            if on_timeout is not None:
                spec["on_timeout"] = {"default": {"score": 0.5, "flag": True}} if on_timeout == "default" else on_timeout
        return {"id": nid("w"), "wait": spec}

    def sleep() -> dict[str, Any]:
        if draw(st.booleans()):
            return {"id": nid("z"), "sleep": draw(st.sampled_from(["1s", "10m"]))}
        return {"id": nid("z"), "sleep": {"until": f"{T0} + input.n * 1000"}}  # sometimes already past

    def sub_workflow() -> dict[str, Any]:
        step: dict[str, Any] = {"id": nid("s"), "workflow": "child", "input": {"n": "${ input.n }", "xs": "${ input.xs }", "route": "${ input.route }"}}
        if draw(st.booleans()):
            step["timeout"] = "1m"
        return on_error(step)

    def compound(depth: int, prev: str | None) -> dict[str, Any]:
        kinds = ["activity"] * 3 + ["terminal", "wait", "sleep"] + (["workflow"] if children else [])
        if depth < MAX_DEPTH:
            kinds += ["parallel", "choice", "loop", "map"] * 2
        kind = draw(st.sampled_from(kinds))
        if kind == "activity":
            return activity()
        if kind == "wait":
            return wait()
        if kind == "workflow":
            return sub_workflow()
        if kind == "sleep":
            return sleep()
        if kind == "terminal":  # an end or fail that only triggers for some inputs
            k = draw(st.integers(0, 5))
            if draw(st.booleans()):
                return {"id": nid("e"), "end": {"when": f"input.n == {k}"}}
            return {"id": nid("f"), "fail": {"when": f"input.n == {k}", "reason": "'refused'"}}
        if kind == "parallel":
            n = draw(st.integers(1, 3))
            branches: dict[str, Any] = {}
            for i in range(n):
                steps = sequence(depth + 1, 2)
                # a branch may carry its own failure policy
                branches[f"b{i}"] = {"on_failure": failure_policy(), "steps": steps} if draw(st.integers(0, 3)) == 0 else steps
            spec: dict[str, Any] = {"branches": branches}
            if draw(st.booleans()):
                fan_out_options(spec, n)
            return on_error({"id": nid("p"), "parallel": spec})
        if kind == "map":  # over input.xs (0 to 3 items)
            spec = {"items": "input.xs", "steps": sequence(depth + 1, 2)}
            if draw(st.booleans()):
                spec["max_concurrency"] = draw(st.integers(1, 2))
            if draw(st.booleans()):
                fan_out_options(spec, 1)
            return on_error({"id": nid("m"), "map": spec})
        if kind == "choice":
            if draw(st.booleans()):
                cases = [{"when": condition(prev), "steps": sequence(depth + 1, 2)} for _ in range(draw(st.integers(1, 2)))]
                spec = {"cases": cases}
            else:
                spec = {"route": "input.route", "routes": {"r0": sequence(depth + 1, 2), "r1": sequence(depth + 1, 2)}}
            spec["default"] = sequence(depth + 1, 2)
            return {"id": nid("c"), "choice": spec}
        # a loop: its first step is always an activity, so `until` may read that activity's output
        first = activity()
        body = [first] + (sequence(depth + 1, 1) if draw(st.booleans()) else [])
        loop: dict[str, Any] = {"max_iterations": draw(st.integers(1, 4)), "steps": body}
        until = draw(st.sampled_from([None, "score", "flag", "iteration"]))
        if until == "score":
            loop["until"] = f"steps.{first['id']}.output.score >= 0.9"
        elif until == "flag":
            loop["until"] = f"steps.{first['id']}.output.flag"
        elif until == "iteration":
            loop["until"] = "iteration >= 2"
        exhausted = draw(st.sampled_from(["fail", "continue", "steps"]))
        loop["on_exhausted"] = [activity()] if exhausted == "steps" else exhausted
        if draw(st.booleans()):
            loop["timeout"] = "30s"
        if draw(st.integers(0, 2)) == 0:
            loop["no_progress"] = draw(st.integers(1, 2))
        if draw(st.integers(0, 2)) == 0:
            loop["for_each"] = "input.xs"
            loop["batch_size"] = draw(st.integers(1, 2))
        return on_error({"id": nid("l"), "loop": loop})

    doc: dict[str, Any] = {"name": name, "steps": sequence(0, 4, min_len=2)}
    if draw(st.booleans()):
        doc["timeout"] = "10m"
    if draw(st.integers(0, 3)) == 0:  # every applied completion costs usd 0.001
        doc["budget"] = {"usd": draw(st.sampled_from([0.0025, 0.0055]))}
        doc["on_budget"] = draw(st.sampled_from(["fail", "finish"]))
    return doc


def progress_bound(doc: dict[str, Any]) -> int:
    """Most events that can move a run of ``doc`` forward (completions and timers actually applied)."""

    def seq(steps: list[dict[str, Any]]) -> int:
        return sum(step(s) for s in steps)

    def step(s: dict[str, Any]) -> int:
        fallback = s.get("on_error", {}).get("fallback", []) if isinstance(s.get("on_error"), dict) else []
        return own(s) + seq(fallback)

    def own(s: dict[str, Any]) -> int:
        if "activity" in s:
            attempts = s.get("retry", {}).get("max_attempts", 1)
            return 2 * attempts - 1  # each attempt ends once; a retry timer between attempts
        if "parallel" in s:
            # a branch retried by on_failure runs up to 3 times; the join timeout may fire once
            return sum(3 * seq(b["steps"] if isinstance(b, dict) else b) for b in s["parallel"]["branches"].values()) + 1
        if "map" in s:
            return MAX_ITEMS * 3 * seq(s["map"]["steps"]) + 1
        if "choice" in s:
            spec = s["choice"]
            paths = [c["steps"] for c in spec.get("cases", [])] + list(spec.get("routes", {}).values()) + [spec["default"]]
            return max(seq(p) for p in paths)
        if "loop" in s:
            exhausted = s["loop"]["on_exhausted"]
            return s["loop"]["max_iterations"] * seq(s["loop"]["steps"]) + 1 + (seq(exhausted) if isinstance(exhausted, list) else 0)
        if "wait" in s or "sleep" in s or "workflow" in s:
            return 1  # its signal or timeout; its timer; its child run's end or timeout
        return 0

    return seq(doc["steps"]) + 1


@st.composite
def scenarios(draw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A workflow ``gen`` (``doc["child"]``: the sub-workflow ``child`` its ``workflow:`` steps start) and an input."""
    doc = draw(workflow_docs(children=True).filter(lambda d: progress_bound(d) <= 200))
    doc = {**doc, "child": draw(workflow_docs("child").filter(lambda d: progress_bound(d) <= 40))}
    run_input = {
        "n": draw(st.integers(0, 5)),
        "route": draw(st.sampled_from(["r0", "r1", "other"])),
        "xs": draw(st.lists(st.integers(0, 9), max_size=MAX_ITEMS)),
    }
    return doc, run_input


# --- invariants --------------------------------------------------------------------------------------


def check_invariants(state: RunState) -> None:
    """Bookkeeping that must hold after every decision."""
    if state.finished:
        assert state.requests == {} and set(state.timers) == {keys.run_timer("run:retention", state.redrives)}
        return
    # a running run is never stuck: something that will move it on is pending
    waiting = [s.key for s in state.steps.values() if s.status == "waiting"]
    children = [s.key for s in state.steps.values() if s.kind == "workflow" and s.status == "running"]
    movers = list(state.requests) + waiting + children + [t for t, timer in state.timers.items() if timer.kind in ("retry", "sleep")]
    assert movers, f"running run with nothing pending: timers={list(state.timers)}"
    for request_id, key in state.requests.items():
        step = state.steps[key]
        assert step.status == "running" and step.request_id == request_id, (request_id, step)
        assert f"{key}:timeout:{step.attempt}" in state.timers
    for timer_id, timer in state.timers.items():
        if timer.kind == "run_timeout":
            continue
        target = state.steps[timer.target]
        if timer.kind == "activity_timeout":
            assert target.status == "running" and target.attempt == timer.attempt, (timer_id, target.status)
        elif timer.kind == "retry":
            assert target.status == "waiting_retry" and target.attempt == timer.attempt, (timer_id, target.status)
        elif timer.kind in ("loop_timeout", "join_timeout", "sleep"):
            assert target.status == "running", (timer_id, target.status)
        elif timer.kind == "wait_timeout":
            assert target.status == "waiting", (timer_id, target.status)
    for step in state.steps.values():
        if step.kind == "activity" and step.status == "running" and not step.children:  # (children: its fallback runs)
            assert state.requests.get(step.request_id) == step.key, step.key
        if step.status == "waiting_retry":
            assert f"{step.key}:retry:{step.attempt}" in state.timers, step.key
        if step.status == "waiting":
            assert step.kind == "wait" and step.signal in SIGNALS, step.key
            assert not any(p.signal == step.signal for p in state.signals), "a kept signal was not delivered to its wait"


# --- the adversarial driver ------------------------------------------------------------------------


class Drive:
    """Drives one run. A child run it starts is driven to its end at once by a Drive of its own; its end
    (``ChildRunFinished``) then waits to be delivered to this run like a completion."""

    def __init__(self, machine: Machine, data: Any, run_id: str = "run-1"):
        self.machine = machine
        self.data = data
        self.run_id = run_id
        self.children: dict[str, ChildRunFinished] = {}  # child run id -> its end, not yet delivered
        self.state: RunState | None = None
        self.now = T0
        self.log: list[tuple[Any, int]] = []
        self.commands: list[Any] = []
        self.issued: dict[str, ActivityRequested] = {}
        self.progress = 0
        self.signal_ids = itertools.count()
        # how hostile this run's world is: 0 = workers always succeed and only due retries fire,
        # 1 = occasional failures and timeouts, 2 = frequent ones
        self.hostility = data.draw(st.sampled_from([0, 1, 1, 2]), label="hostility")

    def deliver(self, event: Any) -> list[Any]:
        self.state, out = self.machine.decide(self.state, event, self.now)
        self.log.append((event, self.now))
        self.commands.extend(out)
        for c in out:
            if isinstance(c, RequestActivity):
                self.issued[c.request.request_id] = c.request
            elif isinstance(c, StartChildRun) and c.accepted.run_id not in self.children:
                self.children[c.accepted.run_id] = self.run_child(c.accepted)
        return out

    def run_child(self, accepted: RunAccepted) -> ChildRunFinished:
        child = Drive(self.machine, self.data, accepted.run_id)
        child.now = self.now
        child.deliver(accepted)
        while not child.state.finished:
            assert len(child.log) < MAX_EVENTS, "a child run does not end"
            child.step()
        [notice] = [c.finished for c in child.commands if isinstance(c, NotifyParent)]
        return notice

    def draw(self, strategy: Any, label: str) -> Any:
        return self.data.draw(strategy, label=label)

    def step(self) -> None:
        state = self.state
        assert state is not None
        action = self.draw(st.sampled_from(["progress", "progress", "progress", "duplicate", "stale", "early signal"]), "action")
        if action == "early signal":  # nobody may wait for it yet: the run keeps it
            self.deliver(self.signal(self.draw(st.sampled_from(SIGNALS), "signal")))
            return
        if action == "duplicate":
            event, _ = self.draw(st.sampled_from(self.log), "duplicate of")
            self.redeliver(event)
            return
        if action == "stale":
            stale = self.stale_completions(state)
            if stale:
                self.redeliver(self.draw(st.sampled_from(stale), "stale"))
                return
        self.advance(state)

    def advance(self, state: RunState) -> None:
        # completions are favoured over timers (every request has a timeout timer), else runs end too early
        timers = sorted(state.timers)
        if self.hostility == 0 and state.requests:
            timers = [t for t in timers if state.timers[t].kind == "retry"]
        waits = sorted({s.signal for s in state.steps.values() if s.status == "waiting"})
        children = sorted(s.child_run for s in state.steps.values() if s.kind == "workflow" and s.status == "running" and s.child_run in self.children and not s.children)
        kinds = (["request"] * (10 if self.hostility < 2 else 3) if state.requests else []) + (["timer"] if timers else []) + (["signal"] * 3 if waits else []) + (["child"] * 3 if children else [])
        kind = self.draw(st.sampled_from(kinds), "kind")
        if kind == "child":
            event: Any = self.children[self.draw(st.sampled_from(children), "child")]
            self.now += self.draw(st.integers(0, 3_000), "elapsed")
            target = None
        elif kind == "signal":
            event = self.signal(self.draw(st.sampled_from(waits), "signal"))
            self.now += self.draw(st.integers(0, 60_000), "elapsed")
            target = None
        else:
            target = self.draw(st.sampled_from(sorted(state.requests) if kind == "request" else timers), kind)
        if kind in ("signal", "child"):
            pass
        elif kind == "timer":
            self.now = max(self.now, state.timers[target].due_ms)
            event = fired(state.run_id, target)
        else:
            self.now += self.draw(st.integers(0, 3_000), "elapsed")
            request = self.issued[target]
            outcomes = [["ok"], ["ok"] * 12 + ["retryable"] * 2 + ["fatal"], ["ok"] * 3 + ["retryable"] * 2 + ["fatal"]]
            outcome = self.draw(st.sampled_from(outcomes[self.hostility]), "outcome")
            if outcome == "ok":
                output = {"score": self.draw(st.sampled_from(SCORES), "score"), "flag": self.draw(st.booleans(), "flag")}
                event = succeeded(request, output, confidence=self.draw(st.sampled_from([None, 0.5, 0.9]), "confidence"), cost={"usd": 0.001, "tokens_in": 3})
            else:
                event = failed(request, "Boom", retryable=outcome == "retryable")
        out = self.deliver(event)
        assert not any(isinstance(c, EventIgnored) for c in out), f"a pending event was refused: {out}"
        self.progress += 1

    def signal(self, name: str) -> SignalSent:
        """A signal with an id of its own (so a redelivery of it is a duplicate)."""
        return SignalSent(run_id=self.run_id, signal=name, data={"score": 0.95, "flag": True}, signal_id=f"sig-{next(self.signal_ids)}")

    def stale_completions(self, state: RunState) -> list[ActivityCompleted]:
        """Completions for requests no longer pending, and ones claiming the wrong attempt."""
        stale: list[ActivityCompleted] = [succeeded(r, {"score": 1.0, "flag": True}) for rid, r in self.issued.items() if rid not in state.requests]
        for request in pending_requests(state):
            stale.append(failed(request, "Wrong", retryable=False, attempt=request.attempt + 1))
        return stale

    def redeliver(self, event: Any) -> None:
        """Property (d): an already-applied, stale or duplicate event changes nothing and is refused."""
        before = self.state
        snapshot = dump(before)
        out = self.deliver(event)
        assert self.state is before and dump(self.state) == snapshot
        assert out and all(isinstance(c, EventIgnored) for c in out), out
        tally(f"refused: {out[0].reason}")
        if isinstance(event, RunAccepted):
            assert [c.reason for c in out] == ["duplicate_trigger"]
        elif isinstance(event, RunRedriveRequested):
            assert [c.reason for c in out] == ["redrive_refused"]
        elif before.finished:
            assert [c.reason for c in out] == ["run_finished"]
        elif isinstance(event, TimerFired):
            assert [c.reason for c in out] == ["stale_timer"]
        elif isinstance(event, SignalSent):
            assert [c.reason for c in out] == ["duplicate_signal"]
        elif isinstance(event, ChildRunFinished):
            assert [c.reason for c in out] == ["stale_child"]
        elif event.request_id in before.requests:  # the pending request, claiming another attempt
            assert [c.reason for c in out] == ["stale_attempt"]
        else:  # an earlier request of this run: the very one applied before, or an older attempt
            assert [c.reason for c in out] in (["duplicate_completion"], ["stale_attempt"])


def machine_for(doc: dict[str, Any]) -> Machine:
    child = compile_workflow(doc["child"], "<generated child>")
    return Machine({"gen": compile_workflow({k: v for k, v in doc.items() if k != "child"}, "<generated>"), "child": child})


@PROPERTY_SETTINGS
@given(scenario=scenarios(), data=st.data())
def test_random_runs_terminate_once_and_replay_deterministically(scenario, data):
    doc, run_input = scenario
    note(yaml.safe_dump(doc, sort_keys=False))
    note(f"input: {run_input}")
    bound = progress_bound(doc)
    drive = Drive(machine_for(doc), data)
    drive.deliver(RunAccepted(run_id="run-1", workflow="gen", input=run_input))
    check_invariants(drive.state)

    # (a) termination: while running, something is always pending, and the run ends within the bound
    while not drive.state.finished:
        assert len(drive.log) < MAX_EVENTS, f"no end after {MAX_EVENTS} events"
        drive.step()
        check_invariants(drive.state)
    assert drive.progress <= bound, (drive.progress, bound)
    assert drive.state.status in ("succeeded", "failed")
    tally(f"outcome: {drive.state.status} {drive.state.error.type if drive.state.error else ''}".strip())
    tally(f"events: {'<10' if len(drive.log) < 10 else '<50' if len(drive.log) < 50 else '>=50'}")

    # some more adversarial traffic after the end: all refused, nothing changes
    for _ in range(data.draw(st.integers(0, 3), label="after the end")):
        event, _ = data.draw(st.sampled_from(drive.log), label="late duplicate")
        drive.redeliver(event)

    # (b) exactly one terminal run event, after everything else the run published
    terminal = terminal_events_in(drive.commands)
    assert len(terminal) == 1
    published = [c for c in drive.commands if isinstance(c, PublishRunEvent)]
    assert published[-1] == terminal[0]
    assert terminal[0].event.status == drive.state.status
    assert len([c for c in published if c.event.type == "run.started"]) == 1

    # (c) determinism: the same events from scratch, with a freshly compiled definition, give the same result
    state, commands = replay(machine_for(doc), drive.log)
    assert dump(state) == dump(drive.state)
    assert commands == drive.commands
    assert [c.model_dump() for c in commands] == [c.model_dump() for c in drive.commands]


@PROPERTY_SETTINGS
@given(scenario=scenarios(), data=st.data())
def test_every_prefix_of_a_log_replays_to_the_state_that_was_seen(scenario, data):
    """Replay is a pure fold: after any prefix of the log, replaying gives the state the driver saw then."""
    doc, run_input = scenario
    note(yaml.safe_dump(doc, sort_keys=False))
    drive = Drive(machine_for(doc), data)
    drive.deliver(RunAccepted(run_id="run-1", workflow="gen", input=run_input))
    seen = [dump(drive.state)]
    while not drive.state.finished and len(drive.log) < MAX_EVENTS:
        drive.advance(drive.state)
        seen.append(dump(drive.state))
    cut = data.draw(st.integers(1, len(drive.log)), label="prefix")
    state, _ = replay(machine_for(doc), drive.log[:cut])
    assert dump(state) == seen[cut - 1]


MAX_REDRIVES = 3


@PROPERTY_SETTINGS
@given(scenario=scenarios(), data=st.data())
def test_a_redriven_run_still_terminates_and_replays_deterministically(scenario, data):
    """A failed run is redriven (up to ``MAX_REDRIVES`` times, while it fails; a refusal changes nothing): after each
    redrive it ends again, with one more terminal event carrying ``redrives: n``; no step that had succeeded is
    requested again, no request id or child run id repeats (attempts continue); the whole log replays to the same
    state and commands. The workflows nest every step kind, so redrives resume failed branches, map items, loop
    iterations, choice paths and fallback steps."""
    doc, run_input = scenario
    note(yaml.safe_dump(doc, sort_keys=False))
    drive = Drive(machine_for(doc), data)
    drive.deliver(RunAccepted(run_id="run-1", workflow="gen", input=run_input))
    while not drive.state.finished:
        assert len(drive.log) < MAX_EVENTS
        drive.step()
    redrives = 0
    while drive.state.status == "failed" and redrives < MAX_REDRIVES:
        before = drive.state
        succeeded_keys = {s.key for s in before.steps.values() if s.status in ("succeeded", "skipped")}
        issued = len(drive.commands)
        out = drive.deliver(RunRedriveRequested(run_id="run-1", reason="property"))
        if all(isinstance(c, EventIgnored) for c in out):
            assert [c.reason for c in out] == ["redrive_refused"] and drive.state is before
            tally(f"redrive refused: {out[0].detail[:40]}")
            break
        redrives += 1
        root = before.steps[keys.step_key("root", drive.machine.pinned(before).workflow.sequences["root"][before.frames["root"].index].id)]
        tally(f"redriven at a {root.kind} step")
        check_invariants(drive.state)
        while not drive.state.finished:
            assert len(drive.log) < (2 + redrives) * MAX_EVENTS, "no end after the redrive"
            drive.step()
            check_invariants(drive.state)
        again = [c.request for c in drive.commands[issued:] if isinstance(c, RequestActivity)]
        assert not [r.request_id for r in again if keys.parse_request_id("run-1", r.request_id)[0] in succeeded_keys]
    terminal = terminal_events_in(drive.commands)
    assert [t.event.redrives for t in terminal] == [None, *range(1, redrives + 1)]
    requested = [c.request.request_id for c in drive.commands if isinstance(c, RequestActivity)]
    assert len(requested) == len(set(requested)), "a request id was used twice"
    children = [c.accepted.run_id for c in drive.commands if isinstance(c, StartChildRun)]
    assert len(children) == len(set(children)), "a child run id was used twice"
    state, commands = replay(machine_for(doc), drive.log)
    assert dump(state) == dump(drive.state) and commands == drive.commands
