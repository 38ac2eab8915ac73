"""The workflow language: YAML documents validated into pydantic models, then compiled.

A definition is refused whole, with the file, the path inside it and the reason; it is never half-loaded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from legato.workflows.durations import parse_duration
from legato.workflows.keys import sequence_ref
from legato.workflows.expressions import Expression, ExpressionError, Template, compile_expression, compile_template

ENGINE_MAX_ITERATIONS = 1000
"""Hard cap on any loop's iterations: a definition asking for more is refused."""

DEFAULT_MAX_ITERATIONS = 100
"""The bound of a loop that sets no ``max_iterations`` (a for_each loop: its number of batches, up to the cap)."""

MAX_WORKFLOW_DEPTH = 5
"""How deep sub-workflows may nest."""

DEFAULT_ACTIVITY_TIMEOUT = 600.0
"""Seconds an activity attempt may take when its step sets no ``timeout``."""

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({
        "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)\s*$"}],
        "description": "a duration: 100ms, 5s, 2m, 1h, 7d, or a number of seconds",
    }),
]
StepId = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=100)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=150)]

_STEP_KINDS = ("activity", "parallel", "map", "choice", "loop", "workflow", "end", "fail", "wait", "sleep")


class DefinitionError(ValueError):
    """A refused definition: where (file and path inside it) and why."""

    def __init__(self, file: str, path: str, reason: str):
        self.file, self.path, self.reason = file, path, reason
        super().__init__(f"{file}: {path or '<document>'}: {reason}")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Retry(_Spec):
    max_attempts: int = Field(default=1, ge=1, le=100)
    backoff: Duration = 1.0
    multiplier: float = Field(default=2.0, ge=1.0, le=10.0)
    max_backoff: Duration = 60.0
    jitter: bool = True  # scale each backoff by a factor in [0.8, 1.2) derived from the request id

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1``."""
        return min(self.backoff * self.multiplier ** (attempt - 1), self.max_backoff)


class DefaultValue(_Spec):
    """``{default: VALUE}``: substitute VALUE for a failed step's or branch's output and go on."""

    default: Any


class Fallback(_Spec):
    """``{fallback: [steps]}``: run these steps instead (e.g. escalate to a human-review activity)."""

    fallback: list["Step"] = Field(min_length=1)


OnError = Union[Literal["fail", "continue"], DefaultValue, Fallback]
FailurePolicy = Union[Literal["fail_fast", "continue", "retry"], DefaultValue]


class NOf(_Spec):
    n_of: int = Field(ge=1)


Join = Union[Literal["all", "any", "first_success"], NOf]


class Cache(_Spec):
    ttl: Duration


class Batch(_Spec):
    max_size: int = Field(ge=1, le=1000)
    max_wait: Duration = 0.05


class RateLimit(_Spec):
    per_second: float = Field(gt=0)


class Limit(_Spec):
    """A budget shared by every coordinator and worker process (docs/limits.md): at least one of the three."""

    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    concurrency: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _something(self) -> "Limit":
        if self.requests_per_minute is None and self.tokens_per_minute is None and self.concurrency is None:
            raise ValueError("a limit sets at least one of requests_per_minute, tokens_per_minute, concurrency")
        return self


class RunConcurrency(_Spec):
    """``concurrency: {key: "${ input.customer_id }", limit: 1}``: runs of one key beyond ``limit`` wait, in the order
    they came, until one finishes."""

    key: str = Field(min_length=1)
    limit: int = Field(ge=1, le=10_000)


class ActivityStep(_Spec):
    id: StepId
    activity: Name
    input: Any = None
    timeout: Duration | None = None  # request to completion, per attempt
    start_timeout: Duration | None = Field(default=None, gt=0)  # request to the handler starting (activity.started)
    run_timeout: Duration | None = Field(default=None, gt=0)  # handler start to completion
    heartbeat: Duration | None = Field(default=None, gt=0)  # longest silence between heartbeats of a started handler
    retry: Retry = Retry()
    on_error: OnError = "fail"
    non_retryable: list[str] = Field(default_factory=list)
    cache: Cache | None = None
    batch: Batch | None = None
    rate_limit: RateLimit | None = None
    limit: Name | None = None  # a cluster-wide limit (``limits:``) the request waits for before it is sent
    limit_key: str | None = None  # CEL template: one budget per value (e.g. "${ input.tenant }")
    approx_tokens: int | str | None = None  # the tokens charged up front (a number or a CEL template), corrected by the completion's cost

    @model_validator(mode="after")
    def _limit_given(self) -> "ActivityStep":
        if self.limit is None and (self.limit_key is not None or self.approx_tokens is not None):
            raise ValueError("`limit_key` and `approx_tokens` need a `limit`")
        return self

    @property
    def watches_start(self) -> bool:
        """Whether the coordinator needs to hear when a handler starts (``activity.started``)."""
        return self.start_timeout is not None or self.run_timeout is not None or self.heartbeat is not None


class WorkflowStep(_Spec):
    """A sub-workflow: starts a child run through the same topics and resumes on its terminal event."""

    id: StepId
    workflow: Name
    version: int | None = Field(default=None, ge=1)  # pin the child's version; None: the highest when the child starts
    input: Any = None
    timeout: Duration | None = None
    on_error: OnError = "fail"


class Branch(_Spec):
    """A parallel branch with its own failure policy."""

    on_failure: FailurePolicy | None = None
    steps: list["Step"] = Field(min_length=1)


class _FanOut(_Spec):
    join: Join = "all"
    timeout: Duration | None = None
    on_timeout: Literal["proceed", "fail"] = "fail"
    on_failure: FailurePolicy | None = None  # default: fail_fast for all/any, continue for first_success/n_of
    confidence: Literal["min", "mean", "winner"] = "min"  # the step's confidence from its branches' (winner: the one that completed the join)

    @property
    def failure_policy(self) -> Any:
        if self.on_failure is not None:
            return self.on_failure
        # first_success and n_of exist to tolerate failing branches: failing fast would make them `any`
        return "continue" if self.join == "first_success" or isinstance(self.join, NOf) else "fail_fast"


class ParallelSpec(_FanOut):
    branches: dict[StepId, Union[Annotated[list["Step"], Field(min_length=1)], Branch]] = Field(min_length=1)

    @model_validator(mode="after")
    def _join_fits(self) -> "ParallelSpec":
        if isinstance(self.join, NOf) and self.join.n_of > len(self.branches):
            raise ValueError(f"join n_of {self.join.n_of} is larger than the number of branches ({len(self.branches)})")
        return self

    def branch_steps(self, name: str) -> list[Any]:
        branch = self.branches[name]
        return branch.steps if isinstance(branch, Branch) else branch

    def branch_policy(self, name: str) -> Any:
        branch = self.branches[name]
        if isinstance(branch, Branch) and branch.on_failure is not None:
            return branch.on_failure
        return self.failure_policy


class ParallelStep(_Spec):
    id: StepId
    parallel: ParallelSpec
    on_error: OnError = "fail"


class MapSpec(_FanOut):
    items: str
    steps: list["Step"] = Field(min_length=1)
    max_concurrency: int | None = Field(default=None, ge=1)


class MapStep(_Spec):
    id: StepId
    map: MapSpec
    on_error: OnError = "fail"


class Case(_Spec):
    when: str
    steps: list["Step"] = Field(min_length=1)


class ChoiceSpec(_Spec):
    cases: list[Case] = Field(default_factory=list)
    route: str | None = None
    routes: dict[StepId, Annotated[list["Step"], Field(min_length=1)]] = Field(default_factory=dict)
    default: list["Step"] = Field(
        min_length=1,
        description="required: every choice covers every path (route to a human-review step if unsure)",
    )

    @model_validator(mode="after")
    def _one_form(self) -> "ChoiceSpec":
        if bool(self.cases) == bool(self.route):
            raise ValueError("a choice has either `cases` or `route` with `routes`")
        if self.route and not self.routes:
            raise ValueError("`route` needs `routes`")
        if self.routes and not self.route:
            raise ValueError("`routes` needs `route`")
        return self


class ChoiceStep(_Spec):
    id: StepId
    choice: ChoiceSpec


class LoopSpec(_Spec):
    steps: list["Step"] = Field(min_length=1)
    max_iterations: int | None = Field(default=None, ge=1)
    until: str | None = None
    timeout: Duration | None = None
    no_progress: int | None = Field(default=None, ge=1)
    on_exhausted: Union[Literal["fail", "continue"], Annotated[list["Step"], Field(min_length=1)]] = "fail"
    for_each: str | None = None
    batch_size: int = Field(default=1, ge=1)

    @property
    def bound(self) -> int:
        return self.max_iterations if self.max_iterations is not None else DEFAULT_MAX_ITERATIONS


class LoopStep(_Spec):
    id: StepId
    loop: LoopSpec
    on_error: OnError = "fail"


class EndSpec(_Spec):
    when: str | None = None
    output: str | None = None


class EndStep(_Spec):
    id: StepId
    end: EndSpec


class FailSpec(_Spec):
    reason: str
    when: str | None = None


class FailStep(_Spec):
    id: StepId
    fail: FailSpec


class WaitSpec(_Spec):
    signal: Name
    timeout: Duration | None = None
    on_timeout: Union[Literal["fail", "continue"], DefaultValue] = "fail"

    @model_validator(mode="after")
    def _timeout_given(self) -> "WaitSpec":
        if "on_timeout" in self.model_fields_set and self.timeout is None:
            raise ValueError("`on_timeout` needs a `timeout`")
        return self


class WaitStep(_Spec):
    """Wait for a signal sent to the run (``legato.signals``); its output is the signal's data."""

    id: StepId
    wait: WaitSpec


class SleepUntil(_Spec):
    until: str  # CEL: epoch milliseconds, or an RFC 3339 timestamp


class SleepStep(_Spec):
    """A durable pause: ``sleep: 10m`` or ``sleep: {until: <CEL>}``; its output is the previous step's."""

    id: StepId
    sleep: Union[Duration, SleepUntil]


def _step_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = [k for k in _STEP_KINDS if k in value]
        return kinds[0] if len(kinds) == 1 else None
    return next((k for k in _STEP_KINDS if isinstance(value, _KIND_MODELS[k])), None)


Step = Annotated[
    Union[
        Annotated[ActivityStep, Tag("activity")],
        Annotated[ParallelStep, Tag("parallel")],
        Annotated[MapStep, Tag("map")],
        Annotated[WorkflowStep, Tag("workflow")],
        Annotated[ChoiceStep, Tag("choice")],
        Annotated[LoopStep, Tag("loop")],
        Annotated[EndStep, Tag("end")],
        Annotated[FailStep, Tag("fail")],
        Annotated[WaitStep, Tag("wait")],
        Annotated[SleepStep, Tag("sleep")],
    ],
    Discriminator(
        _step_kind,
        custom_error_type="step_kind",
        custom_error_message="a step needs an `id` and exactly one of: " + ", ".join(_STEP_KINDS),
    ),
]

_KIND_MODELS: dict[str, type] = {
    "activity": ActivityStep,
    "parallel": ParallelStep,
    "map": MapStep,
    "workflow": WorkflowStep,
    "choice": ChoiceStep,
    "loop": LoopStep,
    "end": EndStep,
    "fail": FailStep,
    "wait": WaitStep,
    "sleep": SleepStep,
}


class Budget(_Spec):
    usd: float | None = Field(default=None, gt=0)
    tokens: int | None = Field(default=None, gt=0)


def _steps_or_limits_schema(schema: dict[str, Any]) -> None:
    """In the published schema too: steps (one at least), or limits alone."""
    schema["anyOf"] = [{"required": ["steps"], "properties": {"steps": {"minItems": 1}}},
                       {"required": ["limits"], "properties": {"limits": {"minProperties": 1}, "steps": {"maxItems": 0}}}]


class Workflow(_Spec):
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_steps_or_limits_schema)

    name: Name
    version: int = Field(default=1, ge=1)
    description: str | None = None
    timeout: Duration | None = None
    retention: Duration | None = None  # how long a finished run is kept (and its run_id taken); None: LEGATO_RETENTION
    output: str | None = None
    completion_topic: Name | None = None
    budget: Budget | None = None
    on_budget: Literal["fail", "finish"] = "fail"
    limits: dict[Name, Limit] = Field(default_factory=dict)  # budgets shared by all processes (docs/limits.md)
    concurrency: RunConcurrency | None = None
    steps: list[Step] = Field(default_factory=list)

    @model_validator(mode="after")
    def _steps_or_limits(self) -> "Workflow":
        if not self.steps and not self.limits:
            raise ValueError("a workflow needs `steps` (a document of `limits` alone may have none)")
        if not self.steps and (self.concurrency is not None or self.output is not None):
            raise ValueError("a document of `limits` alone has no `concurrency` or `output`")
        return self

    @property
    def limits_only(self) -> bool:
        """A document that only declares limits (deployed like a definition; it cannot be triggered)."""
        return not self.steps


for _model in (Fallback, ActivityStep, Branch, ParallelSpec, MapSpec, Case, ChoiceSpec, LoopSpec, Workflow):
    _model.model_rebuild()


def step_kind(step: Any) -> str:
    kind = _step_kind(step)
    assert kind is not None
    return kind


# --- compiled form ------------------------------------------------------------------------------


@dataclass
class CompiledWorkflow:
    """A validated definition with every expression compiled and every step list indexed."""

    definition: Workflow
    sequences: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    steps: dict[str, Any] = field(default_factory=dict)
    expressions: dict[str, Expression] = field(default_factory=dict)
    templates: dict[str, Template] = field(default_factory=dict)
    activities: set[str] = field(default_factory=set)
    children: set[str] = field(default_factory=set)  # workflows started by `workflow:` steps
    limited: set[str] = field(default_factory=set)  # limits its steps name (their own ``limits:`` or deployed ones)

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def version(self) -> int:
        return self.definition.version

    def expr(self, key: str) -> Expression | None:
        return self.expressions.get(key)


def compile_workflow(doc: Any, file: str = "<string>") -> CompiledWorkflow:
    """Validate and compile a parsed YAML document; raise DefinitionError on the first problem."""
    if not isinstance(doc, dict):
        raise DefinitionError(file, "", f"a workflow is a mapping, got {type(doc).__name__}")
    if not doc.get("limits") and not doc.get("steps"):
        raise DefinitionError(file, "steps", "should have at least 1 item (a document of `limits` alone may have none)")
    try:
        wf = Workflow.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise DefinitionError(file, _loc(err["loc"]), err["msg"]) from None
    return _Compiler(file, wf).run()


def load_workflow(path: str | Path) -> CompiledWorkflow:
    return load_source(read_source(path), str(path))


def read_source(path: str | Path) -> str:
    """The text of a definition file, or DefinitionError when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DefinitionError(str(path), "", f"cannot read: {exc}") from None


def load_source(text: str, file: str = "<string>") -> CompiledWorkflow:
    """Parse, validate and compile a definition's YAML text (a file's, or a deployed record's ``source``)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DefinitionError(file, "", f"not valid YAML: {exc}") from None
    return compile_workflow(doc, file)


def load_directories(dirs: list[str | Path]) -> dict[str, CompiledWorkflow]:
    """Every ``*.yaml``/``*.yml`` in ``dirs``, by name; all files are refused if one is invalid."""
    found: dict[str, CompiledWorkflow] = {}
    for directory in dirs:
        d = Path(directory)
        if not d.is_dir():
            raise DefinitionError(str(d), "", "not a directory")
        for path in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
            wf = load_workflow(path)
            if wf.name in found and found[wf.name].version == wf.version:
                raise DefinitionError(str(path), "name", f"workflow {wf.name!r} v{wf.version} is defined twice")
            if wf.name not in found or found[wf.name].version < wf.version:
                found[wf.name] = wf
    for wf in found.values():
        missing = sorted(wf.children - set(found))
        if missing:
            raise DefinitionError(wf.definition.name, "steps", f"sub-workflow {missing[0]!r} is not defined in {', '.join(map(str, dirs))}")
    return found


_UNION_MEMBERS = {"DefaultValue", "Fallback", "NOf", "Branch"}


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _STEP_KINDS and isinstance(prev, int):
            pass  # the discriminator's tag, not a key of the document
        elif isinstance(part, str) and ("[" in part or part in _UNION_MEMBERS):
            pass  # which member of a union pydantic tried, not a key of the document
        else:
            out += f".{part}" if out else str(part)
        prev = part
    return out


class _Compiler:
    def __init__(self, file: str, wf: Workflow):
        self.file = file
        self.out = CompiledWorkflow(definition=wf)
        self.paths: dict[str, str] = {}
        self.refs: list[tuple[str, str, Expression]] = []

    def run(self) -> CompiledWorkflow:
        wf = self.out.definition
        self._sequence("root", wf.steps, "steps", loop_depth=0)
        if wf.output is not None:
            self._expression("output", wf.output, "output")
        if wf.concurrency is not None:
            self._template("run:concurrency", wf.concurrency.key, "concurrency.key")
        for path, key, expr in self.refs:
            unknown = expr.step_refs() - set(self.out.steps)
            if unknown:
                raise DefinitionError(self.file, path, f"refers to unknown step {sorted(unknown)[0]!r}")
        return self.out

    def _fail(self, path: str, reason: str) -> None:
        raise DefinitionError(self.file, path, reason)

    def _expression(self, key: str, source: str, path: str) -> None:
        try:
            expr = compile_expression(source)
        except ExpressionError as exc:
            self._fail(path, str(exc))
        self.out.expressions[key] = expr
        self.refs.append((path, key, expr))

    def _template(self, key: str, source: Any, path: str) -> None:
        try:
            template = compile_template(source)
        except ExpressionError as exc:
            self._fail(path, str(exc))
        self.out.templates[key] = template
        for expr in template.expressions():
            self.refs.append((path, key, expr))

    def _sequence(self, ref: str, steps: list[Any], path: str, loop_depth: int) -> None:
        self.out.sequences[ref] = tuple(steps)
        for i, step in enumerate(steps):
            self._step(step, f"{path}[{i}]", loop_depth)

    def _step(self, step: Any, path: str, loop_depth: int) -> None:
        sid = step.id
        if sid in self.out.steps:
            self._fail(f"{path}.id", f"duplicate step id {sid!r} (first at {self.paths[sid]})")
        self.out.steps[sid] = step
        self.paths[sid] = path
        if isinstance(getattr(step, "on_error", None), Fallback):
            self._sequence(sequence_ref(sid, "fallback"), step.on_error.fallback, f"{path}.on_error.fallback", loop_depth)
        if isinstance(step, (ActivityStep, WorkflowStep)):
            if isinstance(step, ActivityStep):
                self.out.activities.add(step.activity)
                if step.limit is not None:
                    self.out.limited.add(step.limit)
                    if step.limit_key is not None:
                        self._template(f"{sid}:limit_key", step.limit_key, f"{path}.limit_key")
                    if isinstance(step.approx_tokens, str):
                        self._template(f"{sid}:approx_tokens", step.approx_tokens, f"{path}.approx_tokens")
            else:
                self.out.children.add(step.workflow)
            try:
                template = compile_template(step.input)
            except ExpressionError as exc:
                self._fail(f"{path}.input", str(exc))
            self.out.templates[sid] = template
            for expr in template.expressions():
                self.refs.append((f"{path}.input", sid, expr))
        elif isinstance(step, ParallelStep):
            for name in step.parallel.branches:
                branch_path = f"{path}.parallel.branches.{name}"
                if isinstance(step.parallel.branches[name], Branch):
                    branch_path += ".steps"
                self._sequence(sequence_ref(sid, name), step.parallel.branch_steps(name), branch_path, loop_depth)
        elif isinstance(step, MapStep):
            self._expression(f"{sid}.items", step.map.items, f"{path}.map.items")
            self._sequence(sequence_ref(sid, "item"), step.map.steps, f"{path}.map.steps", loop_depth)
        elif isinstance(step, ChoiceStep):
            spec = step.choice
            for i, case in enumerate(spec.cases):
                self._expression(f"{sid}.when.{i}", case.when, f"{path}.choice.cases[{i}].when")
                self._sequence(sequence_ref(sid, f"case{i}"), case.steps, f"{path}.choice.cases[{i}].steps", loop_depth)
            if spec.route:
                self._expression(f"{sid}.route", spec.route, f"{path}.choice.route")
                for name, steps in spec.routes.items():
                    self._sequence(sequence_ref(sid, f"route:{name}"), steps, f"{path}.choice.routes.{name}", loop_depth)
            self._sequence(sequence_ref(sid, "default"), spec.default, f"{path}.choice.default", loop_depth)
        elif isinstance(step, LoopStep):
            spec = step.loop
            if spec.max_iterations is not None and spec.max_iterations > ENGINE_MAX_ITERATIONS:
                self._fail(
                    f"{path}.loop.max_iterations",
                    f"{spec.max_iterations} is above the engine cap of {ENGINE_MAX_ITERATIONS}",
                )
            if spec.until is not None:
                self._expression(f"{sid}.until", spec.until, f"{path}.loop.until")
            if spec.for_each is not None:
                self._expression(f"{sid}.for_each", spec.for_each, f"{path}.loop.for_each")
            self._sequence(sequence_ref(sid, "body"), spec.steps, f"{path}.loop.steps", loop_depth + 1)
            if isinstance(spec.on_exhausted, list):
                self._sequence(sequence_ref(sid, "exhausted"), spec.on_exhausted, f"{path}.loop.on_exhausted", loop_depth)
        elif isinstance(step, EndStep):
            if step.end.when is not None:
                self._expression(f"{sid}.when", step.end.when, f"{path}.end.when")
            if step.end.output is not None:
                self._expression(f"{sid}.output", step.end.output, f"{path}.end.output")
        elif isinstance(step, FailStep):
            if step.fail.when is not None:
                self._expression(f"{sid}.when", step.fail.when, f"{path}.fail.when")
            self._expression(f"{sid}.reason", step.fail.reason, f"{path}.fail.reason")
        elif isinstance(step, SleepStep) and isinstance(step.sleep, SleepUntil):
            self._expression(f"{sid}.until", step.sleep.until, f"{path}.sleep.until")
