"""A guard for a CPython 3.11 bug: ``ast.parse`` raises "SystemError: AST constructor recursion depth mismatch" when
a garbage collection during the parse runs a finalizer that parses too.

3.11 keeps one recursion-depth counter per interpreter while it turns a parsed tree into Python objects (fixed in
3.12, where each call has its own). Finalizers that parse are common in an asyncio process: a Future whose exception
was never retrieved logs a traceback when collected, and 3.11's traceback module parses each source line to place
its carets. A log line can then be lost to "--- Logging error ---", and a parse elsewhere (pytest's assertion
rewriter, hypothesis reading a lambda) fails outright.

``install()`` wraps ``ast.parse`` so that no collection starts during a parse. Idempotent; does nothing on other
versions.
"""
from __future__ import annotations

import ast
import functools
import gc
import sys
from typing import Any

_AFFECTED = sys.implementation.name == "cpython" and sys.version_info[:2] == (3, 11)


def install() -> bool:
    """Make ``ast.parse`` safe from re-entry through finalizers. Returns whether the guard is in place."""
    if not _AFFECTED:
        return False
    if getattr(ast.parse, "_legato_gc_paused", False):
        return True
    parse = ast.parse

    @functools.wraps(parse)
    def parse_with_gc_paused(*args: Any, **kwargs: Any) -> Any:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return parse(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    parse_with_gc_paused._legato_gc_paused = True  # type: ignore[attr-defined]
    ast.parse = parse_with_gc_paused
    return True
