"""Render a compiled workflow as a Mermaid ``flowchart TD`` diagram.

The diagram is for people reading a definition (docs, reviews, the README), so it favours the
conventions of workflow-orchestration articles over a literal dump of the model: a Start and an End
stadium, rectangles for activities, a hexagon fork and a "join (all)" circle for parallel steps, a
diamond and a merge circle for choices, and a subgraph with a labelled back edge for loops.

Node ids are derived from step ids with a one-letter prefix per role (``s_`` the step's own node,
``j_`` join, ``m_`` merge, ``c_`` condition, ``q_`` loop-exhausted failure, ``g_`` loop subgraph).
The prefix keeps ids clear of Mermaid keywords (a step may well be called ``end``) and, because the
part after the prefix is always a whole step id, two roles or two steps can never share an id.
Prefixes never start with ``o`` or ``x``, which Mermaid would read as circle/cross arrow heads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from legato.workflows.model import (
    ActivityStep,
    ChoiceStep,
    CompiledWorkflow,
    EndStep,
    Fallback,
    FailStep,
    LoopStep,
    MapStep,
    NOf,
    ParallelStep,
    SleepStep,
    SleepUntil,
    WaitStep,
    WorkflowStep,
)

__all__ = ["mermaid"]

LABEL_MAX = 40
"""Conditions longer than this are cut: a diamond with a whole CEL expression on its edge is unreadable."""

START_ID = "wf_start"
END_ID = "wf_end"

# Characters that would end a quoted label or an edge label, or that Mermaid/HTML would interpret,
# written as Mermaid entity codes (``#name;`` / ``#decimal;``), which Mermaid decodes when drawing.
_ENTITIES = {
    "#": "#35;",  # a literal `#` followed by `word;` would otherwise be decoded as an entity
    '"': "#quot;",
    "|": "#124;",  # `||` in a condition would otherwise close an edge label `-->|...|`
    "<": "#lt;",
    ">": "#gt;",
    "&": "#amp;",
    "`": "#96;",  # a label starting with "` is a Mermaid markdown string
}

_CLASS_DEFS = (
    ("terminal", "fill:#eef,stroke:#446,stroke-width:2px"),
    ("done", "fill:#dfd,stroke:#393,color:#131"),
    ("fail", "fill:#fdd,stroke:#c00,color:#900"),
    ("control", "fill:#fff8e0,stroke:#a80"),
)


def mermaid(wf: CompiledWorkflow) -> str:
    """Return a Mermaid ``flowchart TD`` diagram of ``wf`` (no trailing newline).

    - Start and End are stadium nodes; every step has exactly one node ``s_<step id>``.
    - activity: rectangle ``<id>`` / ``<activity>``.
    - parallel: hexagon ``parallel: <id>`` with one edge per branch, labelled by the branch name,
      to the branch's chain; the chains meet at a ``join (all)`` circle.
    - choice: diamond; edges labelled by each case's ``when`` (cut to ~40 characters), by route
      name, and ``default``; every path meets at a merge circle.
    - loop: a subgraph holding the body and an ``until met?`` diamond (the loop step's node) with a
      dotted back edge ``until not met (max N)`` and an exit edge labelled by the ``until``
      expression; ``on_exhausted: fail`` adds a red terminal for running out of iterations/time.
    - end / fail: terminal stadiums (``end`` green, with a dotted edge to End since it completes the
      run; ``fail`` red). A ``when`` on them becomes a diamond whose ``no`` edge carries on.

    Steps after an unconditional end/fail are still drawn (the definition has them), but nothing
    leads to them. The function is pure: it reads ``wf.definition`` and returns text.
    """
    return _Renderer().render(wf)


# --- text helpers -------------------------------------------------------------------------------


def _join_text(join: Any) -> str:
    return f"{join.n_of} of n" if isinstance(join, NOf) else str(join)


def _node_id(prefix: str, step_id: str) -> str:
    # Step ids are validated as [A-Za-z_][A-Za-z0-9_]*; sanitising again keeps a hand-built model
    # (bypassing validation) from producing a diagram Mermaid cannot parse.
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_]', '_', step_id)}"


def _escape(text: str) -> str:
    return "".join(_ENTITIES.get(ch, ch) for ch in text)


def _shorten(text: str, limit: int = LABEL_MAX) -> str:
    # Cut before escaping so an entity code is never cut in half.
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _label(*parts: str) -> str:
    """A quoted label: each part escaped, parts on separate lines (the only markup we add)."""
    return '"' + "<br/>".join(_escape(p) for p in parts) + '"'


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    if seconds < 1 and (seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def _entry(step: Any) -> str:
    """The node an edge into ``step`` points at, known before the step is drawn."""
    if isinstance(step, LoopStep):
        return _entry(step.loop.steps[0])  # a loop starts with its body; its own node is the test
    if isinstance(step, (EndStep, FailStep)):
        when = step.end.when if isinstance(step, EndStep) else step.fail.when
        return _node_id("c" if when is not None else "s", step.id)
    return _node_id("s", step.id)


# --- rendering ----------------------------------------------------------------------------------


@dataclass
class _Fragment:
    """A drawn step or step list: where edges come in, and the loose ends that go on.

    An exit is ``(node id, edge label or None)``: the label belongs to the edge that will leave
    the node towards whatever comes next, which is not known yet when the fragment is drawn.
    """

    entry: str
    exits: list[tuple[str, str | None]] = field(default_factory=list)


class _Renderer:
    def __init__(self) -> None:
        self.nodes: list[str] = []  # node and subgraph lines, in nesting order
        self.edges: list[str] = []
        self.classes: dict[str, list[str]] = {name: [] for name, _ in _CLASS_DEFS}
        self.depth = 1

    def render(self, wf: CompiledWorkflow) -> str:
        definition = wf.definition
        title = f"workflow {definition.name} v{definition.version}"
        self.node(START_ID, "([", _label("Start"), "])", "terminal")
        body = self.sequence(definition.steps, [(START_ID, None)])
        self.node(END_ID, "([", _label("End"), "])", "terminal")
        for node, label in body.exits:
            self.edge(node, END_ID, label)
        lines = ["flowchart TD", f"    %% {_shorten(title, 120)}"]
        lines += self.nodes
        # Edges come after every node is declared: Mermaid puts a node in the subgraph where it is
        # first mentioned, so an edge inside a loop's subgraph could drag an outside node into it.
        lines += [f"    {e}" for e in self.edges]
        lines += [f"    classDef {name} {style}" for name, style in _CLASS_DEFS]
        lines += [f"    class {','.join(ids)} {name}" for name, ids in self.classes.items() if ids]
        return "\n".join(lines)

    # -- output primitives --

    def node(self, node_id: str, open_: str, label: str, close: str, css: str | None = None) -> None:
        self.nodes.append("    " * self.depth + f"{node_id}{open_}{label}{close}")
        if css:
            self.classes[css].append(node_id)

    def edge(self, src: str, dst: str, label: str | None = None, dotted: bool = False) -> None:
        arrow = "-.->" if dotted else "-->"
        text = f"|{_label(label)}|" if label is not None else ""
        self.edges.append(f"{src} {arrow}{text} {dst}")

    def connect(self, exits: list[tuple[str, str | None]], dst: str) -> None:
        for node, label in exits:
            self.edge(node, dst, label)

    # -- structure --

    def sequence(self, steps: list[Any], incoming: list[tuple[str, str | None]]) -> _Fragment:
        """Draw ``steps`` as a chain, first joining ``incoming`` loose ends to its entry.

        Edges are written as soon as both ends are known, so the text reads top to bottom in
        execution order (and Mermaid, which lays out in edge order, draws it that way too).
        """
        loose = incoming
        for step in steps:
            self.connect(loose, _entry(step))
            loose = self.step(step).exits
        return _Fragment(_entry(steps[0]), loose)

    def step(self, step: Any) -> _Fragment:
        if isinstance(step, ActivityStep):
            return self.activity(step)
        if isinstance(step, ParallelStep):
            return self._on_error(step, self.parallel(step))
        if isinstance(step, MapStep):
            return self._on_error(step, self.map(step))
        if isinstance(step, WorkflowStep):
            sid = _node_id("s", step.id)
            self.node(sid, "[[", _label(step.id, "workflow: " + step.workflow), "]]")
            return self._on_error(step, _Fragment(sid, [(sid, None)]))
        if isinstance(step, ChoiceStep):
            return self.choice(step)
        if isinstance(step, LoopStep):
            return self._on_error(step, self.loop(step), _node_id("s", step.id))
        if isinstance(step, EndStep):
            return self.terminal(step, step.end.when, ("end: " + step.id,), "done")
        if isinstance(step, FailStep):
            reason = _shorten(step.fail.reason)
            return self.terminal(step, step.fail.when, ("fail: " + step.id, reason), "fail")
        if isinstance(step, WaitStep):
            return self.wait(step)
        if isinstance(step, SleepStep):
            sid = _node_id("s", step.id)
            length = "until " + _shorten(step.sleep.until) if isinstance(step.sleep, SleepUntil) else _duration(step.sleep)
            self.node(sid, "[/", _label(f"sleep: {step.id}", length), "/]", "control")
            return _Fragment(sid, [(sid, None)])
        raise TypeError(f"not a workflow step: {step!r}")

    def wait(self, step: WaitStep) -> _Fragment:
        spec = step.wait
        sid = _node_id("s", step.id)
        detail = f"signal {spec.signal}" + (f", timeout {_duration(spec.timeout)}" if spec.timeout is not None else "")
        self.node(sid, "[/", _label(f"wait: {step.id}", detail), "/]", "control")
        if spec.timeout is None or spec.on_timeout != "fail":
            return _Fragment(sid, [(sid, None)])
        timed_out = _node_id("q", step.id)
        self.node(timed_out, "([", _label(f"fail: {step.id} timed out"), "])", "fail")
        self.edge(sid, timed_out, "timeout")
        return _Fragment(sid, [(sid, "signal")])

    def activity(self, step: ActivityStep) -> _Fragment:
        sid = _node_id("s", step.id)
        self.node(sid, "[", _label(step.id, step.activity), "]")
        return self._on_error(step, _Fragment(sid, [(sid, None)]))

    def _on_error(self, step: Any, frag: _Fragment, source: str | None = None) -> _Fragment:
        """A fallback runs when the step fails for good; its end joins the step's own way on. ``source``: the node
        the failure leaves from (a loop's check; else the step's entry)."""
        if isinstance(step.on_error, Fallback):
            fallback = self.sequence(step.on_error.fallback, [(source or frag.entry, "on error")])
            return _Fragment(frag.entry, frag.exits + fallback.exits)
        return frag

    def map(self, step: MapStep) -> _Fragment:
        spec = step.map
        fork, join = _node_id("s", step.id), _node_id("j", step.id)
        limit = f", max {spec.max_concurrency} at once" if spec.max_concurrency else ""
        self.node(fork, "{{", _label(f"map: {step.id}", f"each of {_shorten(spec.items)}{limit}"), "}}", "control")
        ends = self.sequence(spec.steps, [(fork, "item")]).exits
        if not ends:
            return _Fragment(fork)
        self.node(join, "((", _label(f"join ({_join_text(spec.join)})"), "))", "control")
        self.connect(ends, join)
        return _Fragment(fork, [(join, None)])

    def parallel(self, step: ParallelStep) -> _Fragment:
        fork, join = _node_id("s", step.id), _node_id("j", step.id)
        self.node(fork, "{{", _label(f"parallel: {step.id}"), "}}", "control")
        ends: list[tuple[str, str | None]] = []
        for name in step.parallel.branches:
            ends += self.sequence(step.parallel.branch_steps(name), [(fork, name)]).exits
        if not ends:
            # Every branch stops the run (end/fail): a join nothing reaches would suggest otherwise.
            return _Fragment(fork)
        self.node(join, "((", _label(f"join ({_join_text(step.parallel.join)})"), "))", "control")
        self.connect(ends, join)
        return _Fragment(fork, [(join, None)])

    def choice(self, step: ChoiceStep) -> _Fragment:
        spec = step.choice
        sid, merge = _node_id("s", step.id), _node_id("m", step.id)
        if spec.route:
            self.node(sid, "{", _label(f"choice: {step.id}", "route: " + _shorten(spec.route)), "}", "control")
        else:
            self.node(sid, "{", _label(f"choice: {step.id}"), "}", "control")
        arms: list[tuple[str, list[Any]]] = [(_shorten(case.when), case.steps) for case in spec.cases]
        arms += list(spec.routes.items())
        arms.append(("default", spec.default))
        ends: list[tuple[str, str | None]] = []
        for label, steps in arms:
            ends += self.sequence(steps, [(sid, label)]).exits
        if not ends:
            return _Fragment(sid)
        # A merge point even for one surviving arm: readers expect every choice to close visibly.
        self.node(merge, "((", _label("merge"), "))", "control")
        self.connect(ends, merge)
        return _Fragment(sid, [(merge, None)])

    def loop(self, step: LoopStep) -> _Fragment:
        spec = step.loop
        sid, group, exhausted = _node_id("s", step.id), _node_id("g", step.id), _node_id("q", step.id)
        bound_n = spec.bound
        title = f"loop: {step.id} (" + (f"for each of {_shorten(spec.for_each)}, " if spec.for_each else "") + f"max {bound_n}"
        title += f", timeout {_duration(spec.timeout)})" if spec.timeout is not None else ")"
        self.nodes.append("    " * self.depth + f"subgraph {group}[{_label(title)}]")
        self.depth += 1
        body = self.sequence(spec.steps, [])
        # The engine tests `until` after each iteration, so the loop's own node is that test, at the
        # bottom of the body, and the back edge runs from it to the body's first node.
        check = "until met?" if spec.until is not None else "more iterations?"
        self.node(sid, "{", _label(f"loop: {step.id}", check), "}", "control")
        self.depth -= 1
        self.nodes.append("    " * self.depth + "end")
        self.connect(body.exits, sid)

        if spec.until is None:
            # A counted loop: running out of iterations is its normal end; only a timeout is not.
            self.edge(sid, body.entry, f"next iteration (max {bound_n})", dotted=True)
            exits: list[tuple[str, str | None]] = [(sid, "after the last batch" if spec.for_each else f"after {bound_n} iterations")]
            bound = "timeout" if spec.timeout is not None else None
        else:
            self.edge(sid, body.entry, f"until not met (max {bound_n})", dotted=True)
            exits = [(sid, _shorten(spec.until))]
            bound = f"max {bound_n}" + (" / timeout" if spec.timeout is not None else "")
        if spec.no_progress is not None:
            bound = (bound + " / " if bound else "") + f"no progress x{spec.no_progress}"
        if bound is not None and isinstance(spec.on_exhausted, list):
            exits += self.sequence(spec.on_exhausted, [(sid, f"{bound} reached")]).exits
        elif bound is not None and spec.on_exhausted == "fail":
            self.node(exhausted, "([", _label(f"fail: {step.id} exhausted"), "])", "fail")
            self.edge(sid, exhausted, f"{bound} reached")
        elif bound is not None:
            exits.append((sid, f"{bound} reached (continue)"))
        return _Fragment(body.entry, exits)

    def terminal(self, step: Any, when: str | None, text: tuple[str, ...], css: str) -> _Fragment:
        sid = _node_id("s", step.id)
        self.node(sid, "([", _label(*text), "])", css)
        frag = _Fragment(sid)
        if when is not None:
            # A conditional end/fail stops the run only when its `when` holds; else the list goes on.
            cond = _node_id("c", step.id)
            self.node(cond, "{", _label("when " + _shorten(when)), "}", "control")
            self.edge(cond, sid, "yes")
            frag = _Fragment(cond, [(cond, "no")])
        if css == "done":
            # An end step completes the run successfully: show it arriving at End.
            self.edge(sid, END_ID, dotted=True)
        return frag
