"""Structural checks of the Mermaid diagrams drawn by legato.workflows.graph.

No Mermaid parser is available offline, so the output is held to a strict line grammar (one node,
edge, subgraph, class or comment per line) that is a subset of what Mermaid accepts, and then the
parsed graph is checked against the definition: one node per step, labelled edges, back edges,
no dangling ids, nothing that could break a quoted label.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from legato.workflows.graph import LABEL_MAX, mermaid
from legato.workflows.model import (
    ActivityStep,
    ChoiceStep,
    CompiledWorkflow,
    EndStep,
    Fallback,
    FailStep,
    LoopStep,
    MapStep,
    ParallelStep,
    SleepStep,
    WaitStep,
    WorkflowStep,
    compile_workflow,
    load_workflow,
)

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "workflows" / "examples").glob("*.yaml"))

ID = r"[A-Za-z_][A-Za-z0-9_]*"
LABEL = r'"[^"]*"'  # a quoted label can never hold a raw double quote
SHAPES = {"[": "]", "[[": "]]", "([": "])", "{": "}", "{{": "}}", "((": "))", "[/": "/]"}
NODE_RE = re.compile(rf"^\s*({ID})(\(\[|\(\(|\{{\{{|\{{|\[\[|\[/|\[)({LABEL})(\]\)|\)\)|\}}\}}|\}}|\]\]|/\]|\])$")
EDGE_RE = re.compile(rf"^\s*({ID}) (-->|-\.->)(?:\|({LABEL})\|)? ({ID})$")
SUBGRAPH_RE = re.compile(rf"^\s*subgraph ({ID})\[({LABEL})\]$")
CLASSDEF_RE = re.compile(rf"^\s*classDef ({ID}) [^\"\s]+$")
CLASS_RE = re.compile(rf"^\s*class ({ID}(?:,{ID})*) ({ID})$")
MERMAID_KEYWORDS = {"end", "graph", "flowchart", "subgraph", "class", "classDef", "style", "click", "direction"}


@dataclass
class Diagram:
    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (opening bracket, label text)
    edges: list[tuple[str, str, str | None, str]] = field(default_factory=list)  # src, arrow, label, dst
    subgraphs: dict[str, str] = field(default_factory=dict)
    classes: dict[str, set[str]] = field(default_factory=dict)
    node_subgraph: dict[str, str | None] = field(default_factory=dict)
    subgraph_parent: dict[str, str | None] = field(default_factory=dict)

    def inside(self, node: str, group: str) -> bool:
        """Whether ``node`` is drawn in subgraph ``group``, directly or in a nested one."""
        where = self.node_subgraph[node]
        while where is not None and where != group:
            where = self.subgraph_parent[where]
        return where == group

    def out(self, src: str) -> list[tuple[str, str | None, str]]:
        return [(arrow, label, dst) for s, arrow, label, dst in self.edges if s == src]

    def edge_labels(self, src: str) -> set[str | None]:
        return {label for _, label, _ in self.out(src)}

    def reachable(self, start: str = "wf_start") -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            node = todo.pop()
            for _, _, dst in self.out(node):
                if dst not in seen:
                    seen.add(dst)
                    todo.append(dst)
        return seen


def unquote(label: str) -> str:
    """The text Mermaid shows for a quoted label: entity codes decoded."""
    body = label[1:-1]
    assert not re.search(r'["|<>`&]', body.replace("<br/>", "")), f"unescaped character in {label}"
    return re.sub(
        r"#(\w+);", lambda m: chr(int(m[1])) if m[1].isdigit() else html.unescape(f"&{m[1]};"), body
    )


def parse(text: str) -> Diagram:
    """Parse the diagram with the strict grammar; fail on any line outside it."""
    lines = text.split("\n")
    assert lines[0] == "flowchart TD"
    d = Diagram()
    stack: list[str] = []
    for line in lines[1:]:
        assert line.count('"') % 2 == 0, f"odd number of quotes: {line!r}"
        if m := NODE_RE.match(line):
            node, opening, label, closing = m.groups()
            assert SHAPES[opening] == closing, line
            assert node not in d.nodes and node not in d.subgraphs, f"node {node} declared twice"
            d.nodes[node] = (opening, unquote(label))
            d.node_subgraph[node] = stack[-1] if stack else None
        elif m := EDGE_RE.match(line):
            src, arrow, label, dst = m.groups()
            d.edges.append((src, arrow, unquote(label) if label else None, dst))
        elif m := SUBGRAPH_RE.match(line):
            assert m.group(1) not in d.subgraphs and m.group(1) not in d.nodes
            d.subgraphs[m.group(1)] = unquote(m.group(2))
            d.subgraph_parent[m.group(1)] = stack[-1] if stack else None
            stack.append(m.group(1))
        elif line.strip() == "end":
            assert stack, "`end` without a subgraph"
            stack.pop()
        elif m := CLASS_RE.match(line):
            d.classes.setdefault(m.group(2), set()).update(m.group(1).split(","))
        elif CLASSDEF_RE.match(line) or line.strip().startswith("%%"):
            pass
        else:
            pytest.fail(f"line outside the grammar: {line!r}")
    assert not stack, "unclosed subgraph"
    # Every id an edge or a class statement names is a declared node: nothing dangles.
    for src, _, _, dst in d.edges:
        assert src in d.nodes, f"edge from undeclared {src}"
        assert dst in d.nodes, f"edge to undeclared {dst}"
    for ids in d.classes.values():
        assert ids <= set(d.nodes), ids - set(d.nodes)
    assert not (set(d.nodes) | set(d.subgraphs)) & MERMAID_KEYWORDS
    assert not any(n[0] in "ox" for n in d.nodes), "ids starting with o/x clash with arrow heads"
    return d


def short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= LABEL_MAX else text[: LABEL_MAX - 1].rstrip() + "…"


def walk(steps):
    for step in steps:
        yield step
        if isinstance(step, (ActivityStep, WorkflowStep)) and isinstance(step.on_error, Fallback):
            yield from walk(step.on_error.fallback)
        if isinstance(step, MapStep):
            yield from walk(step.map.steps)
        if isinstance(step, LoopStep) and isinstance(step.loop.on_exhausted, list):
            yield from walk(step.loop.on_exhausted)
        if isinstance(step, ParallelStep):
            for name in step.parallel.branches:
                yield from walk(step.parallel.branch_steps(name))
        elif isinstance(step, ChoiceStep):
            for case in step.choice.cases:
                yield from walk(case.steps)
            for route in step.choice.routes.values():
                yield from walk(route)
            yield from walk(step.choice.default)
        elif isinstance(step, LoopStep):
            yield from walk(step.loop.steps)


def _beyond_core(step) -> bool:
    """Step kinds and options added after the core patterns, whose layout this file does not pin down."""
    if isinstance(step, (MapStep, WorkflowStep)):
        return True
    if isinstance(step, ActivityStep):
        return isinstance(step.on_error, Fallback)
    if isinstance(step, ParallelStep):
        spec = step.parallel
        return spec.join != "all" or any(not isinstance(b, list) for b in spec.branches.values())
    if isinstance(step, LoopStep):
        spec = step.loop
        return spec.max_iterations is None or spec.for_each is not None or spec.no_progress is not None or isinstance(spec.on_exhausted, list)
    return False


def entry_of(step) -> str:
    if isinstance(step, LoopStep):
        return entry_of(step.loop.steps[0])
    when = step.end.when if isinstance(step, EndStep) else step.fail.when if isinstance(step, FailStep) else None
    return f"c_{step.id}" if when is not None else f"s_{step.id}"


def check_structure(wf: CompiledWorkflow) -> Diagram:
    """Every fact the diagram must show about ``wf``, checked step by step."""
    text = mermaid(wf)
    d = parse(text)
    assert d.nodes["wf_start"] == ("([", "Start")
    assert d.nodes["wf_end"] == ("([", "End")
    assert mermaid(wf) == text, "rendering is deterministic"

    steps = list(walk(wf.definition.steps))
    assert {s.id for s in steps} == set(wf.steps)
    step_nodes = {n for n in d.nodes if n.startswith("s_")}
    assert step_nodes == {f"s_{s.id}" for s in steps}, "exactly one s_ node per step id"

    for step in steps:
        sid = f"s_{step.id}"
        shape, label = d.nodes[sid]
        if _beyond_core(step):
            continue  # drawn, reachable and grammatical (checked above and by the caller); no layout facts yet
        if isinstance(step, ParallelStep):
            assert (shape, label) == ("{{", f"parallel: {step.id}")
            branch_edges = {lbl: dst for _, lbl, dst in d.out(sid)}
            assert branch_edges == {name: entry_of(b[0]) for name, b in step.parallel.branches.items()}
            if f"j_{step.id}" in d.nodes:
                assert d.nodes[f"j_{step.id}"] == ("((", "join (all)")
                assert any(dst == f"j_{step.id}" for *_, dst in d.edges)
        elif isinstance(step, ChoiceStep):
            assert shape == "{"
            expected = [(short(c.when), entry_of(c.steps[0])) for c in step.choice.cases]
            expected += [(name, entry_of(r[0])) for name, r in step.choice.routes.items()]
            expected.append(("default", entry_of(step.choice.default[0])))
            assert [(lbl, dst) for _, lbl, dst in d.out(sid)] == expected
        elif isinstance(step, LoopStep):
            spec = step.loop
            body_entry = entry_of(spec.steps[0])
            assert shape == "{"
            assert d.node_subgraph[sid] == f"g_{step.id}"
            assert d.subgraphs[f"g_{step.id}"].startswith(f"loop: {step.id} (max {spec.max_iterations}")
            back = [(arrow, lbl) for arrow, lbl, dst in d.out(sid) if dst == body_entry]
            if spec.until is not None:
                assert back == [("-.->", f"until not met (max {spec.max_iterations})")]
                assert short(spec.until) in d.edge_labels(sid), "exit edge labelled by `until`"
                exhausted = f"q_{step.id}"
                assert (exhausted in d.nodes) == (spec.on_exhausted == "fail")
                if spec.on_exhausted == "fail":
                    assert exhausted in d.classes["fail"]
            else:
                assert back == [("-.->", f"next iteration (max {spec.max_iterations})")]
                # Only a timeout can exhaust a counted loop.
                fails = spec.timeout is not None and spec.on_exhausted == "fail"
                assert (f"q_{step.id}" in d.nodes) == fails
            # The body lives in the loop's subgraph.
            assert d.inside(body_entry, f"g_{step.id}")
            assert all(d.inside(f"s_{s.id}", f"g_{step.id}") for s in walk(spec.steps))
        elif isinstance(step, FailStep):
            assert shape == "(["
            assert sid in d.classes["fail"]
            assert d.out(sid) == []
        elif isinstance(step, EndStep):
            assert shape == "(["
            assert d.out(sid) == [("-.->", None, "wf_end")]
        elif isinstance(step, WaitStep):
            assert shape == "[/" and label.startswith(f"wait: {step.id}\nsignal {step.wait.signal}".replace("\n", "<br/>"))
            timed_out = f"q_{step.id}"
            assert (timed_out in d.nodes) == (step.wait.timeout is not None and step.wait.on_timeout == "fail")
            if timed_out in d.nodes:
                assert ("-->", "timeout", timed_out) in d.out(sid) and timed_out in d.classes["fail"]
        elif isinstance(step, SleepStep):
            assert shape == "[/" and label.startswith(f"sleep: {step.id}")
        else:
            assert (shape, label) == ("[", f"{step.id}\n{step.activity}".replace("\n", "<br/>"))
        if isinstance(step, (EndStep, FailStep)) and entry_of(step).startswith("c_"):
            cond = entry_of(step)
            assert d.nodes[cond][0] == "{"
            assert ("-->", "yes", sid) in d.out(cond)
    return d


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples(path):
    wf = load_workflow(path)
    d = check_structure(wf)
    # The examples have no end/fail steps, so every step is on a path from Start to End.
    reach = d.reachable()
    assert {f"s_{sid}" for sid in wf.steps} <= reach
    assert "wf_end" in reach


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"due_diligence", "support_triage"}


def test_due_diligence_layout():
    d = parse(mermaid(load_workflow(EXAMPLES[[p.stem for p in EXAMPLES].index("due_diligence")])))
    assert d.edge_labels("s_checks") == {"identity", "credit", "references", "background"}
    assert {src for src, _, _, dst in d.edges if dst == "j_checks"} == {
        "s_identity", "s_credit", "s_references", "s_background"
    }
    assert ("-->", None, "s_decide") in d.out("j_checks")
    # the review path waits for a reviewer's signal, then applies the decision
    assert d.out("s_review") == [("-->", None, "s_reviewed")]
    assert {src for src, _, _, dst in d.edges if dst == "m_decide"} == {"s_reject", "s_approve", "s_reviewed"}
    assert d.out("m_decide") == [("-->", None, "wf_end")]
    # `||` and `&&` in the conditions are escaped, and cut to about 40 characters.
    labels = {lbl for _, lbl, _ in d.out("s_decide")}
    assert "!steps.identity.output.verified || step…" in labels
    assert all(len(lbl) <= LABEL_MAX for lbl in labels)


def test_support_triage_loop_inside_choice():
    d = parse(mermaid(load_workflow(EXAMPLES[[p.stem for p in EXAMPLES].index("support_triage")])))
    assert ("-.->", "until not met (max 4)", "s_write_reply") in d.out("s_draft")
    assert ("-->", "steps.write_reply.output.score >= 0.9", "m_route") in d.out("s_draft")
    assert ("-->", "default", "s_write_reply") in d.out("s_route")
    assert ("-->", "max 4 reached", "q_draft") in d.out("s_draft")


NESTED = """
name: nested
steps:
  - id: start
    activity: begin
  - id: pick
    choice:
      cases:
        - when: 'input.tag == "#x;" || input.kind == "vip" && input.score > 3'
          steps:
            - id: rounds
              loop:
                max_iterations: 5
                until: 'steps.gather.output.done == true && steps.score.output.label != "bad"'
                on_exhausted: continue
                timeout: 90s
                steps:
                  - id: gather
                    parallel:
                      branches:
                        web:
                          - id: search
                            activity: web.search
                          - id: inner
                            loop:
                              max_iterations: 2
                              timeout: 500ms
                              steps: [{id: refine, activity: refine}]
                        db:
                          - id: lookup
                            activity: db-lookup
                        guard:
                          - id: stop_bad
                            fail: {reason: "'blocked: ' + input.kind", when: "input.blocked || input.n < 0"}
                          - id: noop
                            activity: noop
                  - id: score
                    activity: score
      default:
        - id: end
          end: {output: "input"}
  - id: route_it
    choice:
      route: 'input["kind"]'
      routes:
        billing:
          - id: outer
            loop:
              max_iterations: 3
              until: "steps.deep.output.ok"
              steps:
                - id: deep
                  loop:
                    max_iterations: 2
                    until: "steps.fix.output.ok"
                    steps: [{id: fix, activity: fix}]
        tech: [{id: done_early, end: {when: "input.quick"}}, {id: tech_work, activity: tech}]
      default:
        - id: give_up
          fail: {reason: "'no `route`'"}
  - id: finish
    activity: finish
"""


def test_nested_parallel_in_loop_in_choice():
    wf = compile_workflow(yaml.safe_load(NESTED))
    d = check_structure(wf)
    # Every step and End are reachable; only the exhausted-loop terminals are extra.
    reach = d.reachable()
    assert {f"s_{sid}" for sid in wf.steps} <= reach
    assert "wf_end" in reach
    # A step called `end` is a plain node id with a prefix, never the `end` keyword.
    assert d.nodes["s_end"] == ("([", "end: end")
    # The parallel inside the loop inside the choice: branches labelled, joined, then on to `score`.
    assert d.edge_labels("s_gather") == {"web", "db", "guard"}
    assert d.node_subgraph["s_gather"] == "g_rounds"
    assert d.node_subgraph["s_rounds"] == "g_rounds" and d.node_subgraph["s_pick"] is None
    assert ("-->", None, "s_score") in d.out("j_gather")
    assert ("-->", "no", "s_noop") in d.out("c_stop_bad")
    assert ("-->", "no", "s_tech_work") in d.out("c_done_early")
    # Nested subgraphs: inner sits in rounds; deep in outer.
    assert d.node_subgraph["s_refine"] == "g_inner" and d.subgraph_parent["g_inner"] == "g_rounds"
    assert d.node_subgraph["s_fix"] == "g_deep" and d.subgraph_parent["g_deep"] == "g_outer"
    # The loop whose body starts with another loop loops back to that inner loop's first node.
    assert ("-.->", "until not met (max 3)", "s_fix") in d.out("s_outer")
    # A counted loop goes on when it runs out of iterations; only its timeout fails it.
    assert ("-->", "after 2 iterations", "j_gather") in d.out("s_inner")
    assert ("-->", "timeout reached", "q_inner") in d.out("s_inner")
    assert d.subgraphs["g_inner"] == "loop: inner (max 2, timeout 500ms)"
    # on_exhausted: continue means two ways out to the merge, no failure node.
    assert "q_rounds" not in d.nodes
    assert ("-->", "max 5 / timeout reached (continue)", "m_pick") in d.out("s_rounds")
    assert d.subgraphs["g_rounds"] == "loop: rounds (max 5, timeout 90s)"
    # Quotes, `#`, `|`, `&`, `<`, `>` in conditions survive as entity codes, cut to ~40 characters.
    case_label = d.out("s_pick")[0][1]
    assert case_label == short('input.tag == "#x;" || input.kind == "vip" && input.score > 3')
    assert d.nodes["s_route_it"][1] == 'choice: route_it<br/>route: input["kind"]'
    assert {"s_give_up", "s_stop_bad"} <= d.classes["fail"]
    assert "s_end" in d.classes["done"]
    # The choice with an `end` default merges only the paths that go on.
    assert {src for src, _, _, dst in d.edges if dst == "m_pick"} == {"s_rounds"}


def test_raw_text_never_breaks_a_label():
    text = mermaid(compile_workflow(yaml.safe_load(NESTED)))
    for line in text.split("\n"):
        stripped = re.sub(LABEL, "", line)
        assert '"' not in stripped, line
    assert '\\"' not in text
    assert '"input.tag == #quot;#35;x;#quot; #124;#124; input.kind == #quot;vi…"' in text


def test_terminal_branches_and_unreachable_steps():
    wf = compile_workflow(yaml.safe_load("""
name: terminals
steps:
  - id: split
    parallel:
      branches:
        a: [{id: stop_a, fail: {reason: "'a'"}}]
        b: [{id: stop_b, end: {}}]
  - id: never
    activity: never
"""))
    d = check_structure(wf)
    # No branch reaches a join, so there is none; the step after it is drawn but unreachable.
    assert "j_split" not in d.nodes
    assert "s_never" in d.nodes and "s_never" not in d.reachable()
    assert d.out("s_stop_a") == []
    assert ("-.->", None, "wf_end") in d.out("s_stop_b")


def test_single_activity():
    d = check_structure(compile_workflow({"name": "one", "steps": [{"id": "only", "activity": "a.b-c"}]}))
    assert d.edges == [("wf_start", "-->", None, "s_only"), ("s_only", "-->", None, "wf_end")]


SMALL = {"name": "small", "steps": [
    {"id": "classify", "activity": "classify_ticket"},
    {"id": "route", "choice": {"cases": [{"when": "steps.classify.output.x == 1", "steps": [{"id": "billing", "activity": "answer_billing"}]}],
                               "default": [{"id": "human", "activity": "escalate"}]}},
    {"id": "reviews", "parallel": {"branches": {"a": [{"id": "ra", "activity": "review"}], "b": [{"id": "rb", "activity": "review"}]}}},
]}

SMALL_MERMAID = """flowchart TD
    %% workflow small v1
    wf_start(["Start"])
    s_classify["classify<br/>classify_ticket"]
    s_route{"choice: route"}
    s_billing["billing<br/>answer_billing"]
    s_human["human<br/>escalate"]
    m_route(("merge"))
    s_reviews{{"parallel: reviews"}}
    s_ra["ra<br/>review"]
    s_rb["rb<br/>review"]
    j_reviews(("join (all)"))
    wf_end(["End"])
    wf_start --> s_classify
    s_classify --> s_route
    s_route -->|"steps.classify.output.x == 1"| s_billing
    s_route -->|"default"| s_human
    s_billing --> m_route
    s_human --> m_route
    m_route --> s_reviews
    s_reviews -->|"a"| s_ra
    s_reviews -->|"b"| s_rb
    s_ra --> j_reviews
    s_rb --> j_reviews
    j_reviews --> wf_end
    classDef terminal fill:#eef,stroke:#446,stroke-width:2px
    classDef done fill:#dfd,stroke:#393,color:#131
    classDef fail fill:#fdd,stroke:#c00,color:#900
    classDef control fill:#fff8e0,stroke:#a80
    class wf_start,wf_end terminal
    class s_route,m_route,s_reviews,j_reviews control"""


def test_mermaid_text_of_a_small_workflow():
    """The whole text for a chain, a choice and a parallel step: nodes by kind (activity box, choice diamond,
    parallel hexagon, merge and join circles), edges labelled with the case's condition and the branch names."""
    assert mermaid(compile_workflow(SMALL)).strip() == SMALL_MERMAID


def test_mermaid_is_pure():
    """Drawing neither changes the definition nor depends on anything but it: two renderings of two compilations
    give the expected text."""
    wf = compile_workflow(SMALL)
    before = wf.definition.model_dump()
    assert mermaid(wf).strip() == SMALL_MERMAID
    assert wf.definition.model_dump() == before
    assert mermaid(compile_workflow(SMALL)).strip() == SMALL_MERMAID
    assert mermaid.__doc__


@pytest.mark.parametrize("kind,source", [("parallel", "s_c"), ("map", "s_c"), ("loop", "s_c")])
def test_a_compound_steps_fallback_leaves_from_it_and_rejoins_after(kind, source):
    body = [{"id": "inner", "activity": "inner"}]
    spec = {"parallel": {"branches": {"a": body}}, "map": {"items": "input.xs", "steps": body}, "loop": {"max_iterations": 2, "steps": body}}[kind]
    wf = compile_workflow({"name": "w", "steps": [{"id": "c", kind: spec, "on_error": {"fallback": [{"id": "rescue", "activity": "rescue"}]}}, {"id": "after", "activity": "after"}]})
    d = parse(mermaid(wf))
    assert ("-->", "on error", "s_rescue") in d.out(source)
    assert ("-->", None, "s_after") in d.out("s_rescue")
