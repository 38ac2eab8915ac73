"""CEL expressions: compiled once per definition, evaluated per event. Never Python eval."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import cel
import orjson

from legato.workflows.claims import Claims, PayloadUnreadable, rereference

_TEMPLATE = re.compile(r"^\$\{\s*(.+?)\s*\}$", re.DOTALL)
_STEP_REF = re.compile(r"\bsteps\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)")
_STEP_INDEX = re.compile(r"\bsteps\s*\[\s*(?:'([^'\\]*)'|\"([^\"\\]*)\")\s*\]")
_STEP_IN = re.compile(r"(?:'([^'\\]*)'|\"([^\"\\]*)\")\s+in\s+steps\b")
_STEPS = re.compile(r"\bsteps\b")
_STEPS_MACRO = re.compile(r"\bsteps\s*\.\s*[A-Za-z_][A-Za-z0-9_]*\s*\(")
_STRING = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


class ExpressionError(ValueError):
    """An expression that failed to compile or to evaluate."""


def approx_tokens(value: Any) -> int:
    """Documented estimate of a value's size in LLM tokens: one token per 4 bytes of its JSON."""
    try:
        size = len(orjson.dumps(value))
    except TypeError:
        size = len(str(value))
    return (size + 3) // 4


_FUNCTIONS = {"approx_tokens": approx_tokens}


@dataclass(frozen=True)
class Expression:
    """A compiled CEL expression and its source."""

    source: str
    program: Any
    names: frozenset[str] = frozenset()

    def evaluate(self, variables: dict[str, Any], claims: Claims | None = None) -> Any:
        """The expression's value. With ``claims``, the references it reads are resolved to values first (of
        ``steps``, only the steps it names: ``steps_read``), and the parts of its result that are such values
        are those references again (``legato.workflows.claims``)."""
        # Only the variables the expression names are converted to CEL values: a 10,000-item `input` would
        # otherwise be converted again for every item of a map.
        used = {k: v for k, v in variables.items() if k in self.names}
        seen = None
        if claims is not None:
            try:
                used, seen = claims.resolve(used, self.steps_read)
            except PayloadUnreadable as exc:
                raise ExpressionError(f"{self.source!r}: {exc}") from None
        try:
            result = self.program.execute(cel.Context(variables=used, functions=_FUNCTIONS))
        except Exception as exc:  # the CEL binding raises KeyError, TypeError, ValueError...
            raise ExpressionError(f"{self.source!r}: {type(exc).__name__}: {exc}") from None
        return rereference(result, seen) if seen else result

    @cached_property
    def steps_read(self) -> set[str] | None:
        """The step ids whose references ``evaluate`` resolves: those named by literal ids, or None (every step)
        when the expression reads ``steps`` otherwise (``steps[input.which]``, ``steps.map(…)``)."""
        if "steps" not in self.names:
            return set()
        code = _STRING.sub("''", self.source)  # text inside strings is not a reference
        if _STEPS_MACRO.search(code):  # steps.map(…), steps.exists(…): a macro over every step
            return None
        for literal_use in (_STEP_REF, _STEP_INDEX, _STEP_IN):
            code = literal_use.sub("", code)
        return None if _STEPS.search(code) else self.step_refs()

    def step_refs(self) -> set[str]:
        """Step ids this expression reads as ``steps.<id>``."""
        refs = {a or b for a, b in _STEP_INDEX.findall(self.source)}
        refs |= {a or b for a, b in _STEP_IN.findall(self.source)}
        refs |= set(_STEP_REF.findall(_STRING.sub("''", self.source)))  # text inside strings is not a reference
        return refs


def compile_expression(source: str) -> Expression:
    if not isinstance(source, str) or not source.strip():
        raise ExpressionError("an expression must be a non-empty string")
    try:
        program = cel.compile(source)
    except Exception as exc:
        raise ExpressionError(f"{source!r} does not compile: {exc}") from None
    return Expression(source, program, frozenset(program.variables()))


@dataclass(frozen=True)
class Template:
    """An ``input`` mapping: ``"${ expr }"`` strings become typed values, everything else is literal."""

    shape: Any

    def render(self, variables: dict[str, Any], claims: Claims | None = None) -> Any:
        return _render(self.shape, variables, claims)

    def expressions(self) -> list[Expression]:
        found: list[Expression] = []
        _collect(self.shape, found)
        return found


def compile_template(value: Any) -> Template:
    return Template(_compile_value(value))


def _compile_value(value: Any) -> Any:
    if isinstance(value, str):
        match = _TEMPLATE.match(value)
        return compile_expression(match.group(1)) if match else value
    if isinstance(value, dict):
        return {k: _compile_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_compile_value(v) for v in value]
    return value


def _render(shape: Any, variables: dict[str, Any], claims: Claims | None) -> Any:
    if isinstance(shape, Expression):
        return shape.evaluate(variables, claims)
    if isinstance(shape, dict):
        return {k: _render(v, variables, claims) for k, v in shape.items()}
    if isinstance(shape, list):
        return [_render(v, variables, claims) for v in shape]
    return shape


def _collect(shape: Any, found: list[Expression]) -> None:
    if isinstance(shape, Expression):
        found.append(shape)
    elif isinstance(shape, dict):
        for v in shape.values():
            _collect(v, found)
    elif isinstance(shape, list):
        for v in shape:
            _collect(v, found)
